import { createWriteStream, type WriteStream } from "node:fs";
import { mkdir, readdir, rename, rm, writeFile, copyFile } from "node:fs/promises";
import path from "node:path";

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
  workers: {
    rank: number;
    samples: number;
    /** This worker's share of the global batch this step. */
    share: number;
    compute_s: number;
    comm_s: number;
    /** Waiting for the slowest worker's compute. */
    idle_s: number;
    bytes_sent: number;
    uncompressed_bytes: number;
    micro_batches: number;
    /** null: the whole share at once. */
    max_micro_batch: number | null;
  }[];
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
  private metrics: WriteStream;

  private constructor(readonly dir: string) {
    this.metrics = createWriteStream(path.join(dir, "metrics.jsonl"), { flags: "a" });
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

  async copyInputs(configPath: string, taskPath: string) {
    await copyFile(configPath, path.join(this.dir, "config.yaml"));
    await copyFile(taskPath, path.join(this.dir, path.basename(taskPath)));
  }

  appendMetrics(line: StepMetrics) {
    this.metrics.write(JSON.stringify(line) + "\n");
  }

  /** Write a checkpoint atomically (temporary folder, then rename) and keep the newest `keep`. */
  async writeCheckpoint(step: number, files: { name: string; data: Uint8Array }[], keep: number): Promise<string> {
    const root = path.join(this.dir, "checkpoints");
    await mkdir(root, { recursive: true });
    const final = path.join(root, `step-${String(step).padStart(6, "0")}`);
    const tmp = `${final}.tmp`;
    await rm(tmp, { recursive: true, force: true });
    await mkdir(tmp);
    for (const f of files) await writeFile(path.join(tmp, path.basename(f.name)), f.data);
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

  async writeSummary(summary: Record<string, unknown>) {
    await this.writeFile("summary.json", JSON.stringify(summary, null, 2) + "\n");
  }

  async close() {
    await new Promise<void>((resolve) => this.metrics.end(() => resolve()));
  }
}
