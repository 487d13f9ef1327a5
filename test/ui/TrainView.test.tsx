import { describe, expect, it } from "vitest";
import { InkReporter, TrainView, initialViewState, reduceView } from "../../src/ui/TrainView.js";
import type { TrainEvent } from "../../src/job/events.js";
import { FakeTty, frameOf, stepEvent, stripAnsi, worker } from "./fixtures.js";

function stateAfter(events: TrainEvent[]) {
  return events.reduce(reduceView, initialViewState({ name: "mnist-cnn", runDir: "runs/mnist-cnn-1" }));
}

describe("TrainView", () => {
  it("shows header, progress, loss, rates, eval and one row per worker", () => {
    const losses = Array.from({ length: 60 }, (_, i) => stepEvent(i + 61, 300, { loss: 2 / (i + 1) }));
    const state = stateAfter([
      { type: "status", message: "starting 3 local workers" },
      ...losses,
      stepEvent(120, 300, {
        workers: [worker(0), worker(1, { state: "joining", device: "mps" }), worker(2, { state: "failed", bytes_sent: 0 })],
      }),
      { type: "eval", step: 100, metrics: { accuracy: 0.9712, loss: 0.0931 } },
      { type: "log", source: "127.0.0.1:7070#1", line: "warming up" },
    ]);
    expect(state.losses).toHaveLength(40);
    const frame = frameOf(<TrainView state={state} />);
    expect(frame).toContain("mnist-cnn");
    expect(frame).toContain("runs/mnist-cnn-1");
    expect(frame).toContain("step 120/300");
    expect(frame).toContain("40%");
    expect(frame).toContain("ETA 36s"); // 24 s for 120 steps -> 36 s for the other 180
    expect(frame).toContain("loss 0.4312");
    expect(frame).toMatch(/[▁▂▃▄▅▆▇█]{10,}/);
    expect(frame).toContain("lr 1.2e-3");
    expect(frame).toContain("312 samples/s");
    expect(frame).toContain("sent 4.1 MB (24.5x compression)");
    expect(frame).toContain("eval @ step 100: accuracy 0.9712  loss 0.0931");
    const rows = frame.split("\n").filter((l) => l.startsWith("127.0.0.1:7070#"));
    expect(rows).toHaveLength(3);
    expect(rows[0]).toMatch(/^127\.0\.0\.1:7070#0\s+cuda:0\s+training\s+32\s+3,840\s+12 ms\s+4 ms\s+2 ms\s+2\.1$/);
    expect(rows[1]).toMatch(/#1\s+mps\s+joining/);
    expect(rows[2]).toMatch(/#2\s+cuda:2\s+failed.*0\.0$/);
    expect(frame).toMatch(/worker\s+device\s+state\s+share\s+samples\s+compute\s+comm\s+idle\s+MB sent/);
    expect(frame).toContain("starting 3 local workers");
    expect(frame).toContain("[127.0.0.1:7070#1] warming up");
  });

  it("shows each validation metric's trend beside the latest values", () => {
    const state = stateAfter([
      { type: "eval", step: 50, metrics: { accuracy: 0.5, loss: 1.2 } },
      { type: "eval", step: 100, metrics: { accuracy: 0.8, loss: 0.6 } },
      { type: "eval", step: 150, metrics: { accuracy: 0.9, loss: 0.3 } },
    ]);
    expect(state.evalHistory).toEqual({ accuracy: [0.5, 0.8, 0.9], loss: [1.2, 0.6, 0.3] });
    const frame = frameOf(<TrainView state={state} />);
    // Rising accuracy, falling loss.
    expect(frame).toContain("eval @ step 150: accuracy 0.9000  loss 0.3000  accuracy ▁▆█  loss █▃▁");
  });

  it("shows the summary when done and an error when failed", () => {
    const state = stateAfter([
      stepEvent(300, 300, { loss: 0.0412, wall_s: 62, samples: 19200 }),
      { type: "done", run_dir: "runs/mnist-cnn-1", summary: { steps: 300 } },
      { type: "error", message: "oops" },
    ]);
    const frame = frameOf(<TrainView state={state} />);
    expect(frame).toContain("step 300/300");
    expect(frame).toContain("100%");
    expect(frame).not.toContain("ETA");
    expect(frame).toContain("done in 1m02s: 300 steps, 19,200 samples");
    expect(frame).toContain("final loss 0.0412");
    expect(frame).toContain("error: oops");
  });

  it("renders before the first step", () => {
    const frame = frameOf(<TrainView state={initialViewState()} />);
    expect(frame).toContain("step 0/0");
    expect(frame).toContain("loss -");
  });
});

describe("InkReporter", () => {
  it("renders events to the stream, throttled, and unmounts on close", async () => {
    const tty = new FakeTty();
    const r = new InkReporter({
      stdout: tty as unknown as NodeJS.WriteStream,
      stderr: tty as unknown as NodeJS.WriteStream,
      name: "mnist-cnn",
      throttleMs: 50,
      patchConsole: false,
    });
    for (let s = 1; s <= 100; s++) r.handle(stepEvent(s, 100, { loss: 1 / s }));
    expect(r.viewState.step).toBe(100);
    await new Promise((res) => setTimeout(res, 120));
    r.handle({ type: "done", run_dir: "runs/x", summary: {} });
    r.close();
    r.close();
    const all = stripAnsi(tty.frames.join(""));
    expect(all).toContain("mnist-cnn");
    expect(all).toContain("step 100/100");
    expect(all).toContain("run dir runs/x");
    // 100 events well inside the throttle window: far fewer frames than events.
    expect(tty.frames.length).toBeLessThan(30);
  });
});
