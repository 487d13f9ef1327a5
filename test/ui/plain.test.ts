import { describe, expect, it } from "vitest";
import { JsonReporter } from "../../src/ui/json.js";
import { PlainReporter } from "../../src/ui/plain.js";
import type { TrainEvent } from "../../src/job/events.js";
import { stepEvent, worker } from "./fixtures.js";

function sink() {
  const chunks: string[] = [];
  return { out: { write: (s: string) => chunks.push(s) }, lines: () => chunks.join("").split("\n").slice(0, -1) };
}

describe("PlainReporter", () => {
  it("prints status, log, eval, checkpoint and step lines", () => {
    const { out, lines } = sink();
    let t = 0;
    const r = new PlainReporter({ out, now: () => t });
    r.handle({ type: "status", message: "starting 3 local workers" });
    r.handle({ type: "log", source: "worker 0", line: "cuda available" });
    r.handle(stepEvent(120));
    r.handle({ type: "eval", step: 100, metrics: { accuracy: 0.97123, loss: 0.09314 } });
    r.handle({ type: "checkpoint", step: 100, path: "runs/x/ckpt-100.pt" });
    r.handle({ type: "error", message: "provider vanished" });
    r.close();
    expect(lines()).toEqual([
      "starting 3 local workers",
      "[worker 0] cuda available",
      "worker 127.0.0.1:7070#0 (rank 0, cuda:0): training",
      "worker 127.0.0.1:7070#1 (rank 1, cuda:1): training",
      "worker 127.0.0.1:7070#2 (rank 2, cuda:2): training",
      "step 120/300  loss 0.4312  lr 1.2e-3  312 samples/s  sent 4.1 MB (24.5x)  [3 workers]",
      "eval @ step 100: accuracy 0.9712  loss 0.0931",
      "checkpoint @ step 100: runs/x/ckpt-100.pt",
      "error: provider vanished",
    ]);
  });

  it("throttles step lines: first, every 10%, every 2 s, and the last", () => {
    const { out, lines } = sink();
    let t = 0;
    const r = new PlainReporter({ out, now: () => t });
    const steps = 100;
    for (let s = 1; s <= steps; s++) {
      t = s * 10; // 10 ms per step: time alone never triggers (100 steps = 1 s)
      r.handle(stepEvent(s, steps, { workers: [] }));
    }
    const printed = lines().map((l) => Number(/^step +(\d+)\//.exec(l)![1]));
    expect(printed).toEqual([1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
  });

  it("prints at least every 2 s of wall time when steps are slow", () => {
    const { out, lines } = sink();
    let t = 0;
    const r = new PlainReporter({ out, now: () => t });
    for (let s = 1; s <= 30; s++) {
      t = s * 700; // 0.7 s per step, 1000 steps: 10% is 100 steps away
      r.handle(stepEvent(s, 1000, { workers: [] }));
    }
    const printed = lines().map((l) => Number(/^step +(\d+)\//.exec(l)![1]));
    expect(printed).toEqual([1, 4, 7, 10, 13, 16, 19, 22, 25, 28]);
    expect(lines()[0]).toBe("step    1/1000  loss 0.4312  lr 1.2e-3  312 samples/s  sent 4.1 MB (24.5x)  [0 workers]");
  });

  it("shows the latest unprinted step before the summary, then the summary", () => {
    const { out, lines } = sink();
    let t = 0;
    const r = new PlainReporter({ out, now: () => t });
    r.handle(stepEvent(1, 300, { workers: [worker(0)] }));
    r.handle(stepEvent(2, 300, { workers: [worker(0)], loss: 0.25 }));
    r.handle({ type: "eval", step: 2, metrics: { accuracy: 0.5 } });
    r.handle({
      type: "done",
      run_dir: "runs/mnist-cnn-1",
      summary: { steps: 300, samples: 19200, wall_s: 62, final_loss: 0.0412 },
    });
    expect(lines()).toEqual([
      "worker 127.0.0.1:7070#0 (rank 0, cuda:0): training",
      "step   1/300  loss 0.4312  lr 1.2e-3  312 samples/s  sent 4.1 MB (24.5x)  [1 worker]",
      "step   2/300  loss 0.2500  lr 1.2e-3  312 samples/s  sent 4.1 MB (24.5x)  [1 worker]",
      "eval @ step 2: accuracy 0.5000",
      "done in 1m02s: 300 steps, 19,200 samples (310 samples/s)",
      "  final loss 0.0412",
      "  eval: accuracy 0.5000",
      "  run dir runs/mnist-cnn-1",
    ]);
  });

  it("gives the training throughput (time in steps) when the summary has it: wall time includes start-up", () => {
    const { out, lines } = sink();
    new PlainReporter({ out }).handle({ type: "done", run_dir: "runs/x", summary: { steps: 60, samples: 3840, wall_s: 15, train_s: 2.4, samples_per_s: 1600 } });
    expect(lines()[0]).toBe("done in 15s: 60 steps, 3,840 samples (1600 samples/s while training)");
  });

  it("reports worker state changes once each", () => {
    const { out, lines } = sink();
    const r = new PlainReporter({ out, now: () => 0 });
    r.handle({ type: "workers", workers: [worker(0, { state: "starting" })] });
    r.handle({ type: "workers", workers: [worker(0, { state: "starting" })] });
    r.handle({ type: "workers", workers: [worker(0, { state: "joining" })] });
    r.handle({ type: "workers", workers: [worker(0, { state: "failed" })] });
    expect(lines()).toEqual([
      "worker 127.0.0.1:7070#0 (rank 0, cuda:0): starting",
      "worker 127.0.0.1:7070#0 (rank 0, cuda:0): joining",
      "worker 127.0.0.1:7070#0 (rank 0, cuda:0): failed",
    ]);
  });

  it("--quiet shows warnings, lost workers, errors and the summary only; --verbose every step and debug lines", () => {
    const events: TrainEvent[] = [
      { type: "status", message: "Connecting to 3 providers" },
      { type: "status", message: "Step 4: shares 20 : 22 : 22", level: "debug" },
      { type: "log", source: "127.0.0.1:7070", line: "worker loaded" },
      { type: "workers", workers: [worker(0, { state: "training" }), worker(1, { state: "training" })] },
      ...Array.from({ length: 5 }, (_, i) => stepEvent(i + 1, 50)),
      { type: "status", message: "Fault: provider lost: 127.0.0.1:7071: heartbeat", level: "warn" },
      { type: "workers", workers: [worker(0, { state: "training" }), worker(1, { state: "lost" })] },
      { type: "eval", step: 5, metrics: { accuracy: 0.5 } },
      { type: "done", run_dir: "runs/x", summary: { steps: 5, samples: 320, wall_s: 2 } },
    ];
    const run = (verbosity: "quiet" | "normal" | "verbose") => {
      const { out, lines } = sink();
      const r = new PlainReporter({ out, now: () => 0, verbosity });
      for (const e of events) r.handle(e);
      r.close();
      return lines();
    };
    expect(run("quiet")).toEqual([
      "Fault: provider lost: 127.0.0.1:7071: heartbeat",
      "worker 127.0.0.1:7070#1 (rank 1, cuda:1): lost",
      "done in 2.0s: 5 steps, 320 samples (160 samples/s)",
      "  final loss 0.4312",
      "  eval: accuracy 0.5000",
      "  run dir runs/x",
    ]);
    const normal = run("normal");
    expect(normal).toContain("Connecting to 3 providers");
    expect(normal).toContain("[127.0.0.1:7070] worker loaded");
    expect(normal.some((l) => l.includes("shares"))).toBe(false);
    expect(normal.filter((l) => l.startsWith("step ")).length).toBeLessThan(5);
    const verbose = run("verbose");
    expect(verbose).toContain("Step 4: shares 20 : 22 : 22");
    expect(verbose.filter((l) => l.startsWith("step "))).toHaveLength(5);
  });

  it("writes nothing after close", () => {
    const { out, lines } = sink();
    const r = new PlainReporter({ out });
    r.close();
    r.handle({ type: "status", message: "late" });
    expect(lines()).toEqual([]);
  });
});

describe("JsonReporter", () => {
  it("writes every event, unthrottled, one JSON object per line", () => {
    const { out, lines } = sink();
    const r = new JsonReporter({ out });
    const events: TrainEvent[] = [
      { type: "status", message: "hello" },
      ...Array.from({ length: 50 }, (_, i) => stepEvent(i + 1, 50)),
      { type: "eval", step: 50, metrics: { accuracy: 0.9 } },
      { type: "done", run_dir: "runs/x", summary: { steps: 50 } },
    ];
    for (const e of events) r.handle(e);
    r.close();
    const parsed = lines().map((l) => JSON.parse(l));
    expect(parsed).toHaveLength(events.length);
    expect(parsed).toEqual(events);
  });

  it("keeps a diverged loss visible", () => {
    const { out, lines } = sink();
    new JsonReporter({ out }).handle(stepEvent(1, 1, { loss: NaN, workers: [] }));
    expect(JSON.parse(lines()[0]!).loss).toBe("NaN");
  });
});
