/** What the live view shows, and how each event changes it (pure, no React). */
import type { DilocoFigures, PipelineStageRow, TrainEvent, WorkerRow } from "../job/events.js";
import { formatSummary, type RunTotals } from "./plain.js";

export const LOSS_HISTORY = 40;
export const MAX_LINES = 6;

export interface TrainViewState {
  /** Job name and run directory for the header, when known. */
  name?: string;
  runDir?: string;
  step: number;
  steps: number;
  loss?: number;
  /** The last LOSS_HISTORY losses, oldest first. */
  losses: number[];
  lr?: number;
  samples: number;
  samplesPerS?: number;
  wallS: number;
  bytesSent: number;
  compressionRatio: number;
  /** Under diloco, the last round's figures. */
  diloco?: DilocoFigures;
  /** Under `parallel`, each stage worker's figures of the last step. */
  pipeline?: PipelineStageRow[];
  eval?: { step: number; metrics: Record<string, number> };
  /** Each validation metric's last LOSS_HISTORY values, oldest first (the trend beside the latest). */
  evalHistory: Record<string, number[]>;
  checkpoint?: { step: number; path: string };
  workers: WorkerRow[];
  /** The last MAX_LINES status and log lines, oldest first. */
  lines: string[];
  /** Show debug status lines (`--verbose`). */
  verbose: boolean;
  /** Summary lines once the run is done. */
  done?: string[];
  error?: string;
}

export function initialViewState(init: { name?: string; runDir?: string; steps?: number; verbose?: boolean } = {}): TrainViewState {
  return {
    verbose: init.verbose ?? false,
    name: init.name,
    runDir: init.runDir,
    step: 0,
    steps: init.steps ?? 0,
    losses: [],
    evalHistory: {},
    samples: 0,
    wallS: 0,
    compressionRatio: 1,
    bytesSent: 0,
    workers: [],
    lines: [],
  };
}

/** `list` with `item` appended, keeping the last `max` (live views hold bounded histories). */
export function appendKeepingLast<T>(list: readonly T[], item: T, max: number): T[] {
  const next = [...list, item];
  return next.length > max ? next.slice(next.length - max) : next;
}

function pushLine(lines: string[], line: string): string[] {
  return appendKeepingLast(lines, line, MAX_LINES);
}

export function reduceView(s: TrainViewState, e: TrainEvent): TrainViewState {
  switch (e.type) {
    case "status":
      if (e.level === "debug" && !s.verbose) return s;
      return { ...s, lines: pushLine(s.lines, e.level === "warn" ? `! ${e.message}` : e.message) };
    case "run":
      return { ...s, runDir: e.run_dir };
    case "log":
      if (e.level === "debug" && !s.verbose) return s;
      return { ...s, lines: pushLine(s.lines, `[${e.source}] ${e.line}`) };
    case "workers":
      return { ...s, workers: e.workers };
    case "step": {
      return {
        ...s,
        step: e.step,
        steps: e.steps,
        loss: e.loss,
        losses: appendKeepingLast(s.losses, e.loss, LOSS_HISTORY),
        lr: e.lr,
        samples: e.samples,
        samplesPerS: e.samples_per_s,
        wallS: e.wall_s,
        bytesSent: e.bytes_sent,
        compressionRatio: e.compression_ratio,
        ...(e.diloco ? { diloco: e.diloco } : {}),
        ...(e.pipeline && e.pipeline.length > 0 ? { pipeline: e.pipeline } : {}),
        workers: e.workers.length > 0 ? e.workers : s.workers,
      };
    }
    case "eval": {
      const evalHistory = { ...s.evalHistory };
      for (const [name, value] of Object.entries(e.metrics)) {
        if (typeof value === "number") evalHistory[name] = appendKeepingLast(evalHistory[name] ?? [], value, LOSS_HISTORY);
      }
      return { ...s, eval: { step: e.step, metrics: e.metrics }, evalHistory };
    }
    case "checkpoint":
      return {
        ...s,
        checkpoint: { step: e.step, path: e.path },
        lines: pushLine(s.lines, `checkpoint @ step ${e.step}: ${e.path}`),
      };
    case "done": {
      const seen: RunTotals = {
        eval: s.eval,
        step:
          s.step > 0
            ? {
                type: "step",
                step: s.step,
                steps: s.steps,
                loss: s.loss ?? NaN,
                lr: s.lr ?? 0,
                samples: s.samples,
                samples_per_s: s.samplesPerS ?? 0,
                wall_s: s.wallS,
                bytes_sent: s.bytesSent,
                compression_ratio: s.compressionRatio,
                workers: s.workers,
              }
            : undefined,
      };
      return { ...s, runDir: e.run_dir, done: formatSummary(e, seen) };
    }
    case "error":
      return { ...s, error: e.message };
  }
}
