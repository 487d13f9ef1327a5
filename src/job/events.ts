import type { StageFigures } from "../strategy/pipeline.js";

/**
 * What the coordinator reports while a job runs. Collected by `job/`, printed by `ui/`
 * (ink view on a terminal, plain lines otherwise, one JSON object per line with --json).
 */
/**
 * starting: its worker is loading. joining: loaded, enters the ring at the next step
 * boundary (first start, restart, or a provider that came back). "left out": removed from
 * the ring because it would slow every step more than it adds. "lost": its provider
 * vanished or hung, or its worker died; the job went on without it.
 */
export type WorkerState = "starting" | "joining" | "training" | "left out" | "lost" | "done" | "failed";

export interface WorkerRow {
  /** Stable id: `<provider address>#<local index>`. */
  id: string;
  rank: number;
  provider: string;
  device: string;
  state: WorkerState;
  /** Samples of the last step's global batch this worker computed. */
  share: number;
  /** Samples this worker has computed over the whole run. */
  samples: number;
  compute_s: number;
  comm_s: number;
  /** Seconds of the last step this worker waited for slower ones to finish computing. */
  idle_s: number;
  /** Bytes this worker's agent sent on the ring over the whole run. */
  bytes_sent: number;
}

/** A DiLoCo round's figures (metrics.jsonl, the live view). */
export interface DilocoFigures {
  round: number;
  inner_steps: number;
  fragment: number;
  outer_lr: number;
  /** Seconds the round's sync took on the slowest member, and of them, hidden behind inner steps. */
  comm_s: number;
  hidden_s: number;
}

export type StatusLevel = "info" | "warn" | "debug";

/** A stage worker's figures of the last step, as the live view shows them: its figures and the layers it holds. */
export type PipelineStageRow = Omit<StageFigures, "act_bytes_sent" | "rss_bytes"> & {
  /** [lo, hi): the top-level layers it holds (null: the task's build_stages). */
  layers: [number, number] | null;
  /** The worker's resident memory after the step (null or absent: not reported). */
  rss_bytes?: number | null;
};

export type TrainEvent =
  /** info: progress a user follows; warn: faults, skipped steps, workers left out; debug: detail (rebalanced shares). */
  | { type: "status"; message: string; level?: StatusLevel }
  /** The run directory is known (created, or reopened to resume). */
  | { type: "run"; run_dir: string; resumed: boolean }
  /** A provider's or worker's line, prefixed with its source. */
  | { type: "log"; source: string; line: string; level?: StatusLevel }
  | { type: "workers"; workers: WorkerRow[] }
  | {
      type: "step";
      step: number;
      steps: number;
      loss: number;
      lr: number;
      samples: number;
      samples_per_s: number;
      wall_s: number;
      bytes_sent: number;
      /** Uncompressed bytes / bytes actually sent, so far (1 with one worker). */
      compression_ratio: number;
      workers: WorkerRow[];
      /** Under diloco: the round just ended, the fragment it synced, its outer lr, and the share of its sync hidden behind inner steps. */
      diloco?: DilocoFigures;
      /** Under `parallel`: one row per stage worker (layers held, its step's compute / send / receive / bubble ms). */
      pipeline?: PipelineStageRow[];
    }
  | { type: "eval"; step: number; metrics: Record<string, number> }
  | { type: "checkpoint"; step: number; path: string }
  | { type: "done"; run_dir: string; summary: Record<string, unknown> }
  /** `kind: task` (exit code 3) with `where` (file: function) for an error in the task's code. */
  | { type: "error"; message: string; kind?: string; where?: string };

export interface Reporter {
  handle(event: TrainEvent): void;
  /** Flush and release the terminal. */
  close(): void;
}
