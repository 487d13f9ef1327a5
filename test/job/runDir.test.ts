import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { RunDir, type StepMetrics } from "../../src/job/runDir.js";
let tmp: { dir: string; remove: () => Promise<void> };
beforeEach(async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "nimble-rundir-"));
  tmp = { dir, remove: () => rm(dir, { recursive: true, force: true }) };
});
afterEach(() => tmp.remove());

const when = new Date(2025, 0, 2, 3, 4, 5);

function metrics(step: number): StepMetrics {
  return {
    step,
    loss: 1 / (step + 1),
    lr: 0.01,
    samples: 64,
    wall_s: step * 0.5,
    step_s: 0.5,
    bytes_sent: 1000 * step,
    ...(step % 2 === 1 ? { eval: { accuracy: 0.5 } } : {}),
    workers: [{ rank: 0, samples: 64, compute_s: 0.4, comm_s: 0.1, bytes_sent: 1000 * step }],
  };
}

const bytes = (s: string) => new TextEncoder().encode(s);

describe("RunDir", () => {
  it("names the folder <name>-<local timestamp> under the output root, creating the root", async () => {
    const root = path.join(tmp.dir, "runs", "nested");
    const run = await RunDir.create(root, "mnist", when);
    expect(run.dir).toBe(path.join(root, "mnist-20250102-030405"));
    expect((await readdir(root))).toEqual(["mnist-20250102-030405"]);
    await run.close();
  });

  it("never reuses a folder: runs started in the same second get -1, -2 ...", async () => {
    const runs = [];
    for (let i = 0; i < 4; i++) runs.push(await RunDir.create(tmp.dir, "job", when));
    expect(runs.map((r) => path.basename(r.dir))).toEqual(["job-20250102-030405", "job-20250102-030405-1", "job-20250102-030405-2", "job-20250102-030405-3"]);
    // Concurrent creations are unique too.
    const more = await Promise.all(Array.from({ length: 6 }, () => RunDir.create(tmp.dir, "job", when)));
    const all = [...runs, ...more].map((r) => r.dir);
    expect(new Set(all).size).toBe(10);
    await Promise.all([...runs, ...more].map((r) => r.close()));
  });

  it("does not take over an existing folder's files", async () => {
    const existing = path.join(tmp.dir, "job-20250102-030405");
    await mkdir(existing);
    await writeFile(path.join(existing, "metrics.jsonl"), "old\n");
    const run = await RunDir.create(tmp.dir, "job", when);
    expect(run.dir).not.toBe(existing);
    run.appendMetrics(metrics(0));
    await run.close();
    expect(await readFile(path.join(existing, "metrics.jsonl"), "utf8")).toBe("old\n");
  });

  it("appends one JSON line per step to metrics.jsonl, readable after close", async () => {
    const run = await RunDir.create(tmp.dir, "m", when);
    const written = Array.from({ length: 25 }, (_, i) => metrics(i));
    for (const m of written) run.appendMetrics(m);
    await run.close();
    const text = await readFile(path.join(run.dir, "metrics.jsonl"), "utf8");
    expect(text.endsWith("\n")).toBe(true);
    const lines = text.trimEnd().split("\n");
    expect(lines).toHaveLength(25);
    expect(lines.map((l) => JSON.parse(l))).toEqual(written);
  });

  it("writes checkpoints to checkpoints/step-NNNNNN with the given files", async () => {
    const run = await RunDir.create(tmp.dir, "c", when);
    const where = await run.writeCheckpoint(
      42,
      [
        { name: "model.pt", data: new Uint8Array([1, 2, 3]) },
        { name: "data.json", data: bytes('{"step": 42}') },
      ],
      3,
    );
    expect(where).toBe(path.join(run.dir, "checkpoints", "step-000042"));
    expect((await readdir(where)).sort()).toEqual(["data.json", "manifest.json", "model.pt"]);
    expect([...(await readFile(path.join(where, "model.pt")))]).toEqual([1, 2, 3]);
    expect(await readFile(path.join(where, "data.json"), "utf8")).toBe('{"step": 42}');
    await run.close();
  });

  it("keeps checkpoint files inside the checkpoint folder whatever their names say", async () => {
    const run = await RunDir.create(tmp.dir, "c", when);
    const where = await run.writeCheckpoint(1, [{ name: "../../escape.pt", data: new Uint8Array([7]) }], 3);
    expect((await readdir(where)).sort()).toEqual(["escape.pt", "manifest.json"]);
    await expect(readFile(path.join(run.dir, "escape.pt"))).rejects.toThrow();
    await run.close();
  });

  it("replaces a leftover .tmp folder from an interrupted write", async () => {
    const run = await RunDir.create(tmp.dir, "c", when);
    const tmpDir = path.join(run.dir, "checkpoints", "step-000010.tmp");
    await mkdir(tmpDir, { recursive: true });
    await writeFile(path.join(tmpDir, "stale.pt"), "half-written");
    const where = await run.writeCheckpoint(10, [{ name: "model.pt", data: bytes("fresh") }], 3);
    expect((await readdir(where)).sort()).toEqual(["manifest.json", "model.pt"]);
    expect(await readFile(path.join(where, "model.pt"), "utf8")).toBe("fresh");
    expect(await readdir(path.join(run.dir, "checkpoints"))).toEqual(["step-000010"]);
    await run.close();
  });

  it("overwrites a checkpoint written again for the same step", async () => {
    const run = await RunDir.create(tmp.dir, "c", when);
    await run.writeCheckpoint(5, [{ name: "old.pt", data: bytes("old") }], 3);
    const where = await run.writeCheckpoint(5, [{ name: "model.pt", data: bytes("new") }], 3);
    expect((await readdir(where)).sort()).toEqual(["manifest.json", "model.pt"]);
    await run.close();
  });

  it("keeps only the newest `keep` checkpoints, by step number", async () => {
    const run = await RunDir.create(tmp.dir, "c", when);
    const root = path.join(run.dir, "checkpoints");
    for (const step of [5, 10, 100, 1000]) await run.writeCheckpoint(step, [{ name: "model.pt", data: bytes(String(step)) }], 2);
    expect((await readdir(root)).sort()).toEqual(["step-000100", "step-001000"]);
    await run.writeCheckpoint(1005, [{ name: "model.pt", data: bytes("1005") }], 2);
    expect((await readdir(root)).sort()).toEqual(["step-001000", "step-001005"]);
    expect(await readFile(path.join(root, "step-001005", "model.pt"), "utf8")).toBe("1005");
    await run.writeCheckpoint(2000, [{ name: "model.pt", data: bytes("2000") }], 1);
    expect(await readdir(root)).toEqual(["step-002000"]);
    await run.close();
  });

  it("keeps the newest checkpoint past step 999999, where the folder name gains a digit", async () => {
    const run = await RunDir.create(tmp.dir, "c", when);
    const root = path.join(run.dir, "checkpoints");
    await run.writeCheckpoint(999_999, [{ name: "model.pt", data: bytes("a") }], 1);
    const where = await run.writeCheckpoint(1_000_000, [{ name: "model.pt", data: bytes("b") }], 1);
    expect(where).toBe(path.join(root, "step-1000000"));
    expect(await readdir(root)).toEqual(["step-1000000"]);
    await run.writeCheckpoint(1_000_500, [{ name: "model.pt", data: bytes("c") }], 2);
    expect((await readdir(root)).sort()).toEqual(["step-1000000", "step-1000500"]);
    await run.close();
  });

  it("writes summary.json as valid JSON, replacing an earlier summary, and leaves no .tmp behind", async () => {
    const run = await RunDir.create(tmp.dir, "s", when);
    await run.writeSummary({ status: "failed", error: 'quote " and \n newline', steps: 3 });
    const summary = { name: "s", status: "completed", steps: 10, final_loss: 0.25, eval: { accuracy: 0.9 }, workers: [{ rank: 0 }] };
    await run.writeSummary(summary);
    expect(JSON.parse(await readFile(path.join(run.dir, "summary.json"), "utf8"))).toEqual(summary);
    await run.close();
    expect((await readdir(run.dir)).filter((f) => f.endsWith(".tmp"))).toEqual([]);
  });
  it("reads back the newest checkpoint whose files match its manifest, naming why newer ones were passed over", async () => {
    const run = await RunDir.create(tmp.dir, "v", when);
    const root = path.join(run.dir, "checkpoints");
    for (const step of [5, 10, 15, 20]) {
      await run.writeCheckpoint(step, [{ name: "model.pt", data: bytes(`weights ${step}`) }, { name: "data.json", data: bytes(`{"step": ${step}}`) }], 4);
    }
    await writeFile(path.join(root, "step-000020", "model.pt"), "weights 2"); // truncated
    await writeFile(path.join(root, "step-000015", "model.pt"), "weights XY"); // same size, altered
    await rm(path.join(root, "step-000010", "manifest.json")); // a write cut short
    const { checkpoint, skipped } = await RunDir.latestCheckpoint(run.dir);
    expect(checkpoint?.step).toBe(5);
    expect(checkpoint?.files.map((f) => [f.name, Buffer.from(f.data).toString()])).toEqual([
      ["model.pt", "weights 5"],
      ["data.json", '{"step": 5}'],
    ]);
    expect(skipped).toEqual([
      "step-000020: model.pt has 9 bytes, the manifest says 10",
      "step-000015: model.pt does not match its sha256 in the manifest",
      "step-000010: it has no manifest (written only partly?)",
    ]);
    await rm(path.join(root, "step-000005", "data.json"));
    expect((await RunDir.latestCheckpoint(run.dir)).checkpoint).toBeNull();
    expect((await RunDir.latestCheckpoint(path.join(tmp.dir, "nowhere"))).checkpoint).toBeNull();
    await run.close();
  });

  it("reopens a run to resume: metrics keep the steps before the checkpoint (and drop a line cut short)", async () => {
    const run = await RunDir.create(tmp.dir, "r", when);
    const line = (step: number) => ({ step, loss: 1 / (step + 1), lr: 0.1, samples: 8, wall_s: step, step_s: 1, bytes_sent: 10, uncompressed_bytes: 20, workers: [] });
    for (let s = 0; s < 7; s++) run.appendMetrics(line(s) as never);
    await run.close();
    await writeFile(path.join(run.dir, "metrics.jsonl"), (await readFile(path.join(run.dir, "metrics.jsonl"), "utf8")) + '{"step": 7, "lo');
    const { run: again, kept, damaged } = await RunDir.reopen(run.dir, 5);
    expect(kept.map((m) => m.step)).toEqual([0, 1, 2, 3, 4]);
    expect(damaged).toEqual([]); // a last line cut short is no damage
    await again.settleResume();
    again.appendMetrics(line(5) as never);
    await again.close();
    const steps = (await readFile(path.join(run.dir, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l).step);
    expect(steps).toEqual([0, 1, 2, 3, 4, 5]);
  });

  it("a resume changes nothing on disk until it settles: a failed one leaves the run as it was", async () => {
    const run = await RunDir.create(tmp.dir, "r", when);
    const line = (step: number) => ({ step, loss: 1, lr: 0.1, samples: 8, wall_s: step, step_s: 1, bytes_sent: 10, uncompressed_bytes: 20, workers: [] });
    for (let s = 0; s < 6; s++) run.appendMetrics(line(s) as never);
    await run.writeSummary({ status: "completed" });
    await run.close();
    const metricsFile = path.join(run.dir, "metrics.jsonl");
    const before = await readFile(metricsFile, "utf8");
    const { run: again } = await RunDir.reopen(run.dir, 2);
    expect(again.unsettled).toBe(true);
    // The workers never loaded the checkpoint: the coordinator writes a failed summary and closes.
    await again.writeSummary({ status: "failed" });
    await again.close();
    expect(await readFile(metricsFile, "utf8")).toBe(before);
    expect(JSON.parse(await readFile(path.join(run.dir, "summary.json"), "utf8")).status).toBe("completed");
    expect(() => again.appendMetrics(line(2) as never)).toThrow(/before the resume settled/);
  });

  it("names a damaged line in the middle of metrics.jsonl, and passes over a manifest that is not its folder's step", async () => {
    const run = await RunDir.create(tmp.dir, "r", when);
    await run.close();
    const line = (step: number) => JSON.stringify({ step, loss: 1, lr: 0.1, samples: 8, wall_s: step, step_s: 1, bytes_sent: 10, uncompressed_bytes: 20, workers: [] });
    await writeFile(path.join(run.dir, "metrics.jsonl"), `${line(0)}\n{"step": 1, "lo\n${line(2)}\n`);
    expect((await RunDir.reopen(run.dir, 10)).damaged).toEqual([2]);
    const where = path.join(run.dir, "checkpoints", "step-000004");
    await mkdir(where, { recursive: true });
    await writeFile(path.join(where, "manifest.json"), JSON.stringify({ step: -1, files: {} }));
    const { checkpoint, skipped } = await RunDir.latestCheckpoint(run.dir);
    expect(checkpoint).toBeNull();
    expect(skipped).toEqual(["step-000004: the manifest says step -1"]);
  });
});
