import { createHash } from "node:crypto";
import { createWriteStream, type WriteStream } from "node:fs";
import { copyFile, mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { unpackPackage, type TaskPackage } from "./package.js";
import path from "node:path";
import type { WorkerFigures } from "../strategy/sync.js";
import type { DilocoFigures } from "./events.js";
import { parseMetricsLines } from "./metricsFile.js";

/** A checkpoint read back and verified against its manifest. */
export interface Checkpoint {
  /** Steps completed: training continues at this step. */
  step: number;
  dir: string;
  files: { name: string; data: Uint8Array }[];
}

const MANIFEST = "manifest.json";

function sha256(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/** One line of metrics.jsonl: one per optimizer step. */
export interface StepMetrics {
  step: number;
  /** Global batch loss; null on a step skipped for non-finite gradients. */
  loss: number | null;
  lr: number;
  /** Samples in this step's global batch. */
  samples: number;
  /** Seconds since training started, at the end of this step. */
  wall_s: number;
  /** Seconds this step took, coordinator's view. */
  step_s: number;
  /** Bytes all workers sent on the ring during this step. */
  bytes_sent: number;
  /** What the same all-reduces would have sent as plain float32. */
  uncompressed_bytes: number;
  skipped?: boolean;
  /** On a skipped step: the non-finite tensors, with the rank that found them. */
  nonfinite?: string[];
  /** Validation metrics, on the steps where evaluation ran. */
  eval?: Record<string, number>;
  /** Seconds that evaluation took (included in step_s and wall_s). */
  eval_s?: number;
  /** Under diloco: the round this line ends (a line per round, `step` its last inner step). */
  diloco?: DilocoFigures;
  /** Each member's figures, with its share of the global batch this step. */
  workers: (WorkerFigures & { share: number })[];
}

function stamp(date: Date): string {
  const p = (n: number) => String(n).padStart(2, "0");
  return `${date.getFullYear()}${p(date.getMonth() + 1)}${p(date.getDate())}-${p(date.getHours())}${p(date.getMinutes())}${p(date.getSeconds())}`;
}

/**
 * A run directory: config and task copies, metrics.jsonl (appended as steps complete, so a
 * crash loses nothing already computed), checkpoints/step-NNNNNN/, model.safetensors,
 * summary.json.
 */
export class RunDir {
  #metrics: WriteStream | null = null;

  /** Resuming: the metrics kept from before the checkpoint, written back only by `settleResume`. */
  #pendingKept: StepMetrics[] | null = null;

  private constructor(readonly dir: string) {}

  /**
   * An existing run directory, to resume: the metrics of the steps before `keepBefore`
   * (and the line numbers of damaged lines, which are dropped). Nothing on disk changes
   * until `settleResume`, once every worker has loaded the checkpoint: a resume that fails
   * before that leaves the run as it was.
   */
  static async reopen(dir: string, keepBefore: number): Promise<{ run: RunDir; kept: StepMetrics[]; damaged: number[] }> {
    const file = path.join(dir, "metrics.jsonl");
    let text = "";
    try {
      text = await readFile(file, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    }
    const parsed = parseMetricsLines(text);
    const kept = parsed.metrics.filter((m) => m.step < keepBefore);
    const damaged = parsed.damaged.map((d) => d.line);
    const run = new RunDir(dir);
    run.#pendingKept = kept;
    return { run, kept, damaged };
  }

  /** Resuming for good (every worker loaded the checkpoint): metrics.jsonl keeps only the steps before it. */
  async settleResume(configText?: string): Promise<void> {
    const kept = this.#pendingKept;
    if (kept === null) return;
    // Resumed with --set overrides: the run's config.yaml becomes the config as it now applies.
    if (configText !== undefined) await writeFile(path.join(this.dir, "config.yaml"), configText);
    const file = path.join(this.dir, "metrics.jsonl");
    await writeFile(`${file}.tmp`, kept.map((m) => JSON.stringify(m) + "\n").join(""));
    await rename(`${file}.tmp`, file);
    this.#pendingKept = null;
  }

  /** A resume not settled yet: nothing may be written. */
  get unsettled(): boolean {
    return this.#pendingKept !== null;
  }

  /**
   * The newest checkpoint whose files match its manifest (sha256 and size), and why each
   * newer one was passed over (a crash mid-write, a truncated or altered file).
   */
  static async latestCheckpoint(dir: string): Promise<{ checkpoint: Checkpoint | null; skipped: string[] }> {
    const root = path.join(dir, "checkpoints");
    let names: string[] = [];
    try {
      names = (await readdir(root)).filter((n) => /^step-\d+$/.test(n)).sort((a, b) => Number(b.slice(5)) - Number(a.slice(5)));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    }
    const skipped: string[] = [];
    for (const name of names) {
      const where = path.join(root, name);
      try {
        const manifest = JSON.parse(await readFile(path.join(where, MANIFEST), "utf8")) as { step: number; files: Record<string, { sha256: string; bytes: number }> };
        if (!Number.isInteger(manifest.step) || typeof manifest.files !== "object" || manifest.files === null) throw new Error("the manifest is malformed");
        // The folder names the step: a manifest that says otherwise (or step 0 or less) is not this checkpoint's.
        if (manifest.step < 1 || manifest.step !== Number(name.slice(5))) throw new Error(`the manifest says step ${manifest.step}`);
        const files: Checkpoint["files"] = [];
        for (const [file, want] of Object.entries(manifest.files)) {
          if (path.basename(file) !== file) throw new Error(`the manifest names ${JSON.stringify(file)}`);
          const data = await readFile(path.join(where, file)).catch(() => {
            throw new Error(`${file} is missing`);
          });
          if (data.byteLength !== want.bytes) throw new Error(`${file} has ${data.byteLength} bytes, the manifest says ${want.bytes}`);
          if (sha256(data) !== want.sha256) throw new Error(`${file} does not match its sha256 in the manifest`);
          files.push({ name: file, data });
        }
        return { checkpoint: { step: manifest.step, dir: where, files }, skipped };
      } catch (err) {
        const why = (err as NodeJS.ErrnoException).code === "ENOENT" ? "it has no manifest (written only partly?)" : (err as Error).message;
        skipped.push(`${name}: ${why}`);
      }
    }
    return { checkpoint: null, skipped };
  }

  static async create(outputRoot: string, name: string, now = new Date()): Promise<RunDir> {
    await mkdir(outputRoot, { recursive: true });
    const base = path.resolve(outputRoot, `${name}-${stamp(now)}`);
    for (let i = 0; ; i++) {
      const dir = i === 0 ? base : `${base}-${i}`;
      try {
        await mkdir(dir);
        return new RunDir(dir);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      }
    }
  }

  /**
   * The run's inputs: the config as it applies (with any --set overrides written in) and
   * the task: its file, or for a task folder the package's files in a folder of that name.
   */
  async copyInputs(configText: string, taskPath: string, pkg: TaskPackage | null = null) {
    await writeFile(path.join(this.dir, "config.yaml"), configText);
    if (pkg) await unpackPackage(pkg.blob, path.join(this.dir, path.basename(taskPath)));
    else await copyFile(taskPath, path.join(this.dir, path.basename(taskPath)));
  }

  appendMetrics(line: StepMetrics) {
    if (this.unsettled) throw new Error("metrics appended before the resume settled");
    this.#metrics ??= createWriteStream(path.join(this.dir, "metrics.jsonl"), { flags: "a" });
    this.#metrics.write(JSON.stringify(line) + "\n");
  }

  /** Write a checkpoint atomically (temporary folder, then rename) and keep the newest `keep`. */
  async writeCheckpoint(step: number, files: { name: string; data: Uint8Array }[], keep: number): Promise<string> {
    const root = path.join(this.dir, "checkpoints");
    await mkdir(root, { recursive: true });
    const final = path.join(root, `step-${String(step).padStart(6, "0")}`);
    const tmp = `${final}.tmp`;
    await rm(tmp, { recursive: true, force: true });
    await mkdir(tmp);
    const manifest: { step: number; files: Record<string, { sha256: string; bytes: number }> } = { step, files: {} };
    for (const f of files) {
      const name = path.basename(f.name);
      await writeFile(path.join(tmp, name), f.data);
      manifest.files[name] = { sha256: sha256(f.data), bytes: f.data.byteLength };
    }
    // Written last: a checkpoint without its manifest is known incomplete.
    await writeFile(path.join(tmp, MANIFEST), JSON.stringify(manifest, null, 2) + "\n");
    await rm(final, { recursive: true, force: true });
    await rename(tmp, final);
    // By step number: past step 999999 the names gain a digit and no longer sort as text.
    const all = (await readdir(root)).filter((n) => /^step-\d+$/.test(n)).sort((a, b) => Number(a.slice(5)) - Number(b.slice(5)));
    for (const old of all.slice(0, Math.max(0, all.length - keep))) await rm(path.join(root, old), { recursive: true, force: true });
    return final;
  }

  async writeFile(name: string, data: Uint8Array | string) {
    const final = path.join(this.dir, name);
    await writeFile(`${final}.tmp`, data);
    await rename(`${final}.tmp`, final);
  }

  /** The run's summary; a resume that never settled leaves the old one (the run is as it was). */
  async writeSummary(summary: Record<string, unknown>) {
    if (this.unsettled) return;
    await this.writeFile("summary.json", JSON.stringify(summary, null, 2) + "\n");
  }

  async close() {
    const metrics = this.#metrics;
    this.#metrics = null;
    if (metrics) await new Promise<void>((resolve) => metrics.end(() => resolve()));
  }

  /**
   * Training went back to `step` mid-run (a lost stage taken over from its mirror): metrics
   * lines of that step and later are dropped, to be written again. Returns the lines kept.
   */
  async rollBackTo(step: number): Promise<StepMetrics[]> {
    await this.close();
    const file = path.join(this.dir, "metrics.jsonl");
    const text = await readFile(file, "utf8").catch(() => "");
    const kept = parseMetricsLines(text).metrics.filter((m) => m.step < step);
    await writeFile(`${file}.tmp`, kept.map((m) => JSON.stringify(m) + "\n").join(""));
    await rename(`${file}.tmp`, file);
    return kept;
  }
}
