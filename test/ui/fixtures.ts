import { render } from "ink-testing-library";
import type { ReactElement } from "react";
import { EventEmitter } from "node:events";
import type { TrainEvent, WorkerRow } from "../../src/job/events.js";

export function worker(i: number, over: Partial<WorkerRow> = {}): WorkerRow {
  return {
    id: `127.0.0.1:7070#${i}`,
    rank: i,
    provider: "127.0.0.1:7070",
    device: `cuda:${i}`,
    state: "training",
    share: 32,
    samples: 3840,
    compute_s: 0.012,
    comm_s: 0.004,
    idle_s: 0.002,
    bytes_sent: 2_100_000,
    ...over,
  };
}

export function stepEvent(step: number, steps = 300, over: Partial<Extract<TrainEvent, { type: "step" }>> = {}) {
  return {
    type: "step" as const,
    step,
    steps,
    loss: 0.4312,
    lr: 1.2e-3,
    samples: step * 64,
    samples_per_s: 312,
    wall_s: step * 0.2,
    bytes_sent: 4_100_000,
    compression_ratio: 24.5,
    workers: [worker(0), worker(1), worker(2)],
    ...over,
  };
}

export const stripAnsi = (s: string) => s.replace(/\u001b\[[0-9;?]*[A-Za-z]/g, "");

/** A terminal for ink to draw on: says it is a TTY and keeps every frame written. */
export class FakeTty extends EventEmitter {
  isTTY = true;
  columns = 120;
  rows = 40;
  frames: string[] = [];
  write = (s: string) => {
    this.frames.push(s);
    return true;
  };
}

/** The text of a view's frame, colours stripped (rendered once and unmounted). */
export function frameOf(view: ReactElement): string {
  const { lastFrame, unmount } = render(view);
  const frame = stripAnsi(lastFrame() ?? "");
  unmount();
  return frame;
}
