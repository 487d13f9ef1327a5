import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { formatRunDetail, formatRunList, runListing } from "../../src/runs/format.js";
import { listRuns, loadRun, resolveRun, runFigures } from "../../src/runs/runData.js";
import { UserError } from "../../src/errors.js";

let root = "";
beforeEach(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), "nimble-runs-"));
});
afterEach(async () => {
  await rm(root, { recursive: true, force: true });
});

function stepLine(step: number, loss: number, extra: Record<string, unknown> = {}) {
  return JSON.stringify({
    step,
    loss,
    lr: 0.01,
    samples: 64,
    wall_s: step + 1,
    step_s: 1,
    bytes_sent: 1000,
    uncompressed_bytes: 4000,
    workers: [{ rank: 0, samples: 32 }, { rank: 1, samples: 32 }],
    ...extra,
  });
}

async function completedRun(name: string) {
  const dir = path.join(root, name);
  await mkdir(path.join(dir, "checkpoints", "step-000010"), { recursive: true });
  await mkdir(path.join(dir, "checkpoints", "step-000020"), { recursive: true });
  await writeFile(path.join(dir, "config.yaml"), "name: mnist-cnn\nsteps: 20\n");
  await writeFile(path.join(dir, "metrics.jsonl"), Array.from({ length: 20 }, (_, i) => stepLine(i, 2 - i * 0.05)).join("\n") + "\n");
  await writeFile(
    path.join(dir, "summary.json"),
    JSON.stringify({
      name: "mnist-cnn",
      status: "completed",
      steps: 20,
      samples: 1280,
      wall_s: 20,
      final_loss: 1.05,
      eval: { loss: 1.1, accuracy: 0.8125 },
      eval_step: 19,
      bytes_sent: 20000,
      compression_ratio: 4,
      compression: { method: "powersgd", rank: 4 },
      steps_skipped: [],
      steps_redone: [12],
      left_out: [],
      faults: [{ step: 12, wall_s: 12.5, kind: "provider lost", ranks: [1], reason: "127.0.0.1:7071: no heartbeat for 3 s", recovery_s: 0.4 }],
      links: [],
      workers: [
        { id: "127.0.0.1:7070#0", rank: 0, provider: "ws://127.0.0.1:7070", device: "cpu", samples: 700, share: 0.547 },
        { id: "127.0.0.1:7071#0", rank: 1, provider: "ws://127.0.0.1:7071", device: "cpu", samples: 580, share: 0.453 },
      ],
      run_dir: dir,
      started_at: "2026-11-25T10:00:00.000Z",
    }),
  );
  return dir;
}

/** A run killed mid-step: no summary, its last metrics line cut short. */
async function killedRun(name: string) {
  const dir = path.join(root, name);
  await mkdir(dir, { recursive: true });
  await writeFile(path.join(dir, "config.yaml"), "name: charlm # the char model\n");
  await writeFile(path.join(dir, "metrics.jsonl"), [stepLine(0, 4.2), stepLine(1, 3.9, { eval: { loss: 3.8 } }), stepLine(2, 3.7).slice(0, 30)].join("\n"));
  return dir;
}

describe("reading run directories", () => {
  it("reads a completed run's figures from its summary, and a killed run's from its metrics", async () => {
    const done = await loadRun(await completedRun("mnist-cnn-20261125-100000"));
    expect(done).toMatchObject({ name: "mnist-cnn", status: "completed", checkpoints: [10, 20] });
    expect(runFigures(done)).toMatchObject({ steps: 20, samples: 1280, samples_per_s: 64, final_loss: 1.05, workers: 2, faults: 1, compression_ratio: 4 });

    const killed = await loadRun(await killedRun("charlm-20261126-080000"));
    expect(killed).toMatchObject({ name: "charlm", status: "incomplete", summary: null, checkpoints: [] });
    expect(killed.metrics.map((m) => m.step)).toEqual([0, 1]);
    expect(runFigures(killed)).toMatchObject({ steps: 2, samples: 128, wall_s: 2, samples_per_s: 64, final_loss: 3.9, eval: { loss: 3.8 }, bytes_sent: 2000, compression_ratio: 4, workers: 2 });
  });

  it("lists runs oldest first, passing over folders that are not runs", async () => {
    await killedRun("charlm-20261126-080000");
    await completedRun("mnist-cnn-20261125-100000");
    await mkdir(path.join(root, "not-a-run"));
    const runs = await listRuns(root);
    expect(runs.map((r) => path.basename(r.dir))).toEqual(["mnist-cnn-20261125-100000", "charlm-20261126-080000"]);
    const text = formatRunList(runs, root);
    expect(text[0]).toMatch(/^run\s+status\s+started\s+steps\s+time\s+loss\s+eval\s+samples\/s\s+sent\s+workers\s+faults$/);
    expect(text[1]).toMatch(/^mnist-cnn-20261125-100000\s+completed\s+.*\s20\s+20s\s+1\.0500\s+accuracy 0\.8125\s+64\.0\s+20\.0 kB\s+2\s+1$/);
    expect(text[2]).toMatch(/^charlm-20261126-080000\s+incomplete\s/);
    expect(runListing(runs[0]!)).toMatchObject({ run: "mnist-cnn-20261125-100000", status: "completed", figures: { steps: 20 } });
    expect(await listRuns(path.join(root, "absent"))).toEqual([]);
  });

  it("shows one run: figures, workers, faults with their recovery, checkpoints", async () => {
    const run = await loadRun(await completedRun("mnist-cnn-20261125-100000"));
    const text = formatRunDetail(run).join("\n");
    expect(text).toMatch(/steps\s+20 \(1 redone after faults\)/);
    expect(text).toContain("eval @ 20   loss 1.1000  accuracy 0.8125");
    expect(text).toContain("(4.0x compression, powersgd rank 4)");
    expect(text).toContain("checkpoints step 10, step 20");
    expect(text).toMatch(/1\s+127\.0\.0\.1:7071#0\s+cpu\s+580\s+45\.3%/);
    expect(text).toContain("step 12: provider lost (rank 1), recovered in 0.4 s: 127.0.0.1:7071: no heartbeat for 3 s");
  });

  it("finds a run by path, folder name or unique prefix, and names the choices when a prefix is ambiguous", async () => {
    const a = await completedRun("mnist-cnn-20261125-100000");
    const b = await completedRun("mnist-cnn-20261125-110000");
    await killedRun("charlm-20261126-080000");
    expect(await resolveRun(a, "/nowhere")).toBe(a);
    expect(await resolveRun("mnist-cnn-20261125-110000", root)).toBe(b);
    expect(await resolveRun("char", root)).toBe(path.join(root, "charlm-20261126-080000"));
    await expect(resolveRun("mnist", root)).rejects.toThrow(/matches 2 runs.*mnist-cnn-20261125-100000, mnist-cnn-20261125-110000/);
    await expect(resolveRun("gpt", root)).rejects.toBeInstanceOf(UserError);
    await expect(loadRun(root)).rejects.toThrow(/is not a run directory/);
  });
});

describe("damaged run files", () => {
  it("runs, runs show and report read what they can and name the bad file and field", async () => {
    const good = path.join(root, "good-1");
    await mkdir(good);
    await writeFile(path.join(good, "metrics.jsonl"), [stepLine(0, 2), stepLine(1, 1.5)].join("\n") + "\n");
    const nulls = path.join(root, "nulls-1");
    await mkdir(nulls);
    await writeFile(path.join(nulls, "summary.json"), JSON.stringify({ name: "x", status: "completed", steps: 2, workers: [null] }));
    await writeFile(path.join(nulls, "metrics.jsonl"), [stepLine(0, 2), stepLine(1, 1, { wall_s: "soon" }), stepLine(2, 1)].join("\n") + "\n");
    const folder = path.join(root, "folder-1");
    await mkdir(path.join(folder, "metrics.jsonl"), { recursive: true });
    await writeFile(path.join(folder, "config.yaml"), "name: f\n");

    const run = await loadRun(nulls);
    expect(run.summary).toBeNull();
    expect(run.problems).toEqual([expect.stringMatching(/^summary\.json: /), "metrics.jsonl line 2: wall_s: Expected number, received string"]);
    expect(run.metrics.map((m) => m.step)).toEqual([0, 2]);
    expect(() => formatRunDetail(run)).not.toThrow();
    const dir = await loadRun(folder);
    expect(dir.problems).toEqual(["metrics.jsonl: cannot be read (it is a folder)"]);
    // One bad run does not break the list.
    const all = await listRuns(root);
    expect(all.map((r) => path.basename(r.dir)).sort()).toEqual(["folder-1", "good-1", "nulls-1"]);
    expect(() => formatRunList(all, root)).not.toThrow();
    expect(() => all.map(runFigures)).not.toThrow();
  });
});
