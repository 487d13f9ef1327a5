import type { JobConfig } from "../../config/schema.js";
import type { SyncResult } from "../../strategy/sync.js";
import type { PipelineResult, StageFigures } from "../../strategy/pipeline.js";
import type { StepMetrics } from "../runDir.js";
import type { DilocoFigures } from "../events.js";
import type { CollectiveSummary } from "./collective.js";
import type { Fault } from "./errors.js";
import { StartupClock, type StartupSummary } from "./startup.js";

export interface PipelineSummary {
  config: NonNullable<JobConfig["parallel"]>;
  plan: unknown;
  why: string[];
  /** Per stage worker, of the last step. */
  stages: StageFigures[];
  /** The last step's timeline: [F|B, chain, micro-batch, start, end] per worker, seconds from the step's first event. */
  timeline: { step: number; workers: { rank: number; stage: number; events: [string, number, number, number, number][] }[] } | null;
  /** Peak autograd-saved bytes per stage over the run. */
  peak_saved_bytes: number[];
}

export interface OrdersAheadSummary {
  mode: "auto" | "on" | "off";
  from_step: number | null;
  control_share: number | null;
}

export interface TrainSummary {
  name: string;
  status: "completed" | "failed" | "cancelled";
  error?: string;
  steps: number;
  samples: number;
  wall_s: number;
  /** Seconds spent in steps (evaluation included; start-up, connecting and loading left out). */
  train_s: number;
  /** samples / train_s: the training throughput, which wall_s would understate on short runs. */
  samples_per_s: number | null;
  final_loss: number | null;
  eval: Record<string, number> | null;
  eval_step: number | null;
  bytes_sent: number;
  /** Of bytes_sent, the initial broadcast of rank 0's weights. */
  sync_bytes: number;
  /** What the steps' collectives would have sent as plain float32 all-reduces. */
  uncompressed_bytes: number;
  /** uncompressed_bytes / (bytes_sent - sync_bytes). */
  compression_ratio: number;
  compression: JobConfig["compression"];
  strategy: JobConfig["strategy"];
  /** Under diloco: rounds synced, wire bytes per round, and the share of sync time hidden behind inner steps. */
  diloco?: { rounds: number; bytes_per_round: number; sync_s: number; hidden_s: number; hidden_fraction: number | null };
  /**
   * Under `parallel`: the plan (stages, their layers, memory estimates, and why), the stages'
   * figures of the last step, and that step's timeline (when each worker ran which micro-batch).
   */
  pipeline?: PipelineSummary;
  /** Under sync: orders ahead (README, "Orders ahead"): the mode, the step they began at (null: never), and the control round trip's share of a step that `auto` measured. */
  orders_ahead?: OrdersAheadSummary;
  /** Steps whose update every worker skipped because of non-finite gradients. */
  steps_skipped: number[];
  /** Workers left out of the ring because they would have slowed every step, and why. */
  left_out: { rank: number; id: string; after_step: number; reason: string }[];
  /** Faults survived: when, what, who, and seconds from the fault to the next completed step. */
  /** wall_s: when the fault was first noticed, on the same clock as metrics.jsonl's wall_s. */
  faults: { step: number; wall_s: number; kind: Fault["kind"]; ranks: number[]; reason: string; recovery_s: number | null }[];
  /** Steps abandoned by a fault and run again (once per abandonment). */
  steps_redone: number[];
  /** Pipeline: steps training went back to after a sole-held stage was taken over from its mirror. */
  rolled_back_to?: number[];
  /** How the all-reduces ran: the cost model's choice for the gradient all-reduce, its inputs and what was seen. */
  collective?: CollectiveSummary;
  /** Each provider's measured upload to its ring successor (none for a single host). */
  links: { rank: number; to: number; rtt_ms: number | null; upload_bytes_per_s: number | null }[];
  workers: { id: string; rank: number; provider: string; device: string; samples: number; share: number }[];
  run_dir: string;
  started_at: string;
  /** Where the time to the first completed step went (absent when no step completed). */
  startup?: StartupSummary;
}

type FaultEntry = TrainSummary["faults"][number];

/**
 * The run's figures: counters, each step's metrics line, and the summary. Changed only by
 * the `record*` transitions; read by `summary` and `metricsOf`.
 */
export class Tally {
  readonly started = Date.now();
  readonly startedAt = new Date().toISOString();
  stepsDone = 0;
  samplesDone = 0;
  /** Sum of the completed steps' step_s (resumed runs: the kept steps' too). */
  trainSeconds = 0;
  bytesSent = 0;
  uncompressedBytes = 0;
  /** The initial weight broadcast: counted in bytes_sent, not in the compression ratio. */
  syncBytes = 0;
  lastLoss: number | null = null;
  lastEval: Record<string, number> | null = null;
  lastEvalStep: number | null = null;
  readonly stepsSkipped: number[] = [];
  readonly leftOut: TrainSummary["left_out"] = [];
  readonly faults: FaultEntry[] = [];
  readonly stepsRedone: number[] = [];
  readonly links: TrainSummary["links"] = [];
  readonly startup = new StartupClock();
  /** Faults whose recovery time (to the next completed step) is still open. */
  #unrecovered: { entry: FaultEntry; at: number }[] = [];
  /** The last steps' samples and seconds, for the samples/s the live view shows. */
  readonly #recent: { samples: number; seconds: number }[] = [];

  /** Uncompressed / actual bytes on the wire; 1 when nothing travelled (one worker). */
  get compressionRatio(): number {
    return this.bytesSent - this.syncBytes > 0 ? this.uncompressedBytes / (this.bytesSent - this.syncBytes) : 1;
  }

  get recentRate(): number {
    const samples = this.#recent.reduce((a, b) => a + b.samples, 0);
    return samples / Math.max(1e-9, this.#recent.reduce((a, b) => a + b.seconds, 0));
  }

  /** Resuming: the figures of the steps kept from before the checkpoint. */
  recordKept(step: number, kept: StepMetrics[]): void {
    this.stepsDone = step;
    for (const m of kept) {
      this.samplesDone += m.samples;
      this.trainSeconds += m.step_s;
      this.bytesSent += m.bytes_sent;
      this.uncompressedBytes += m.uncompressed_bytes;
      if (m.loss !== null) this.lastLoss = m.loss;
      if (m.skipped) this.stepsSkipped.push(m.step);
    }
  }

  /** Training went back to `step` (metrics lines `kept` are those before it); bytes already sent stay counted. */
  rollBack(step: number, kept: StepMetrics[]): void {
    this.stepsDone = step;
    this.samplesDone = kept.reduce((a, m) => a + m.samples, 0);
    this.trainSeconds = kept.reduce((a, m) => a + m.step_s, 0);
    this.lastLoss = [...kept].reverse().find((m) => m.loss !== null)?.loss ?? null;
    this.stepsSkipped.splice(0, this.stepsSkipped.length, ...this.stepsSkipped.filter((s) => s < step));
    this.#recent.length = 0;
    this.rolledBack.push(step);
  }

  /** Steps training went back to, mid-run, after a sole-held stage was taken over from its mirror. */
  readonly rolledBack: number[] = [];

  recordSync(bytes: number): void {
    this.syncBytes = bytes;
    this.bytesSent += bytes;
  }

  recordFaults(step: number, faults: Fault[]): void {
    // A lost member also breaks its neighbours' links: those reports are its echo, not
    // faults of their own. Recovery time counts from the first sign of trouble.
    const losses = faults.filter((f) => f.ranks.length > 0);
    const firstAt = Math.min(...faults.map((f) => f.at));
    for (const f of losses.length > 0 ? losses : faults.slice(0, 1)) {
      const entry = { step, wall_s: (firstAt - this.started) / 1000, kind: f.kind, ranks: f.ranks, reason: f.reason, recovery_s: null };
      this.faults.push(entry);
      this.#unrecovered.push({ entry, at: firstAt });
    }
  }

  /** A loss told again with more to it (a crash, then that the worker gives up): keep the fuller reason. */
  retell(ranks: readonly number[], reason: string, pending: readonly Fault[]): void {
    const known = [...this.faults, ...pending].reverse().find((f) => f.ranks.some((r) => ranks.includes(r)));
    if (known && reason.startsWith(known.reason)) known.reason = reason;
  }

  /** DiLoCo rounds: how many, and their sync seconds (slowest member) and of them hidden ones. */
  readonly diloco = { rounds: 0, bytes: 0, syncS: 0, hiddenS: 0 };
  ordersAhead: OrdersAheadSummary | null = null;
  /** Pipeline parallelism's plan and figures (null: no pipeline). */
  pipeline: PipelineSummary | null = null;

  recordPipelinePlan(config: NonNullable<JobConfig["parallel"]>, plan: unknown, why: string[]): void {
    this.pipeline = { config, plan, why, stages: [], timeline: null, peak_saved_bytes: new Array(config.pipeline_stages).fill(0) };
  }

  /** A pipeline step's figures: the stages' of the last step, its timeline relative to its first event. */
  recordPipelineStep(result: PipelineResult): void {
    const p = this.pipeline;
    if (!p) return;
    p.stages = result.stages;
    for (const s of result.stages) p.peak_saved_bytes[s.stage] = Math.max(p.peak_saved_bytes[s.stage] ?? 0, s.peak_saved_bytes);
    const t0 = Math.min(...result.timelines.flatMap((w) => w.timeline.map((e) => e[3])));
    if (!Number.isFinite(t0)) return;
    const r = (x: number) => Math.round((x - t0) * 1e6) / 1e6;
    p.timeline = { step: result.round, workers: result.timelines.map((w) => ({ rank: w.rank, stage: w.stage, events: w.timeline.map((e) => [e[0], e[1], e[2], r(e[3]), r(e[4])] as [string, number, number, number, number]) })) };
  }

  recordRound(figures: DilocoFigures, bytes: number): void {
    this.diloco.rounds += 1;
    this.diloco.bytes += bytes;
    this.diloco.syncS += figures.comm_s + figures.hidden_s;
    this.diloco.hiddenS += figures.hidden_s;
  }

  /** A step completed: faults before it are recovered from. */
  recordStep(result: SyncResult): void {
    const now = Date.now();
    for (const u of this.#unrecovered) u.entry.recovery_s = (now - u.at) / 1000;
    this.#unrecovered = [];
    this.stepsDone = result.round + 1;
    this.samplesDone += result.samples;
    this.bytesSent += result.bytesSent;
    this.uncompressedBytes += result.uncompressedBytes;
    if (result.skipped) this.stepsSkipped.push(result.round);
    else this.lastLoss = result.loss;
  }

  recordLinks(links: TrainSummary["links"]): void {
    this.links.push(...links);
    this.links.sort((a, b) => a.rank - b.rank);
  }

  recordLeftOut(entry: TrainSummary["left_out"][number]): void {
    this.leftOut.push(entry);
  }

  /** A round abandoned by a fault, to run again. */
  recordRedone(step: number): void {
    this.stepsRedone.push(step);
  }

  recordEval(step: number, metrics: Record<string, number>): void {
    this.lastEval = metrics;
    this.lastEvalStep = step;
  }

  /** The step's metrics line, once its evaluation (if any) is done: `stepStart` is Date.now() when it began. */
  metricsOf(result: SyncResult, stepStart: number, evaluation?: { metrics: Record<string, number>; seconds: number }, diloco?: DilocoFigures): StepMetrics {
    const now = Date.now();
    const stepSeconds = (now - stepStart) / 1000;
    this.trainSeconds += stepSeconds;
    this.#recent.push({ samples: result.samples, seconds: stepSeconds });
    if (this.#recent.length > 20) this.#recent.shift();
    return {
      step: result.round,
      loss: result.skipped ? null : result.loss,
      lr: result.lr,
      samples: result.samples,
      wall_s: (now - this.started) / 1000,
      step_s: stepSeconds,
      bytes_sent: result.bytesSent,
      uncompressed_bytes: result.uncompressedBytes,
      ...(result.skipped ? { skipped: true, nonfinite: result.nonfinite } : {}),
      ...(evaluation ? { eval: evaluation.metrics, eval_s: evaluation.seconds } : {}),
      ...(diloco ? { diloco } : {}),
      ...("stages" in result ? { pipeline: (result as PipelineResult).stages } : {}),
      workers: result.workers.map(({ rank, samples, ...rest }) => ({ rank, samples, share: samples, ...rest })),
    };
  }

  summary(
    config: JobConfig,
    status: TrainSummary["status"],
    workers: { id: string; rank: number; provider: string; device: string; samples: number }[],
    runDir: string,
    error?: string,
  ): TrainSummary {
    return {
      name: config.name,
      status,
      ...(error ? { error } : {}),
      steps: this.stepsDone,
      samples: this.samplesDone,
      wall_s: (Date.now() - this.started) / 1000,
      train_s: this.trainSeconds,
      samples_per_s: this.trainSeconds > 0 ? this.samplesDone / this.trainSeconds : null,
      final_loss: this.lastLoss,
      eval: this.lastEval,
      eval_step: this.lastEvalStep,
      bytes_sent: this.bytesSent,
      sync_bytes: this.syncBytes,
      uncompressed_bytes: this.uncompressedBytes,
      compression_ratio: this.compressionRatio,
      compression: config.compression,
      strategy: config.strategy,
      ...(config.strategy.name === "diloco"
        ? {
            diloco: {
              rounds: this.diloco.rounds,
              bytes_per_round: this.diloco.rounds ? this.diloco.bytes / this.diloco.rounds : 0,
              sync_s: this.diloco.syncS,
              hidden_s: this.diloco.hiddenS,
              hidden_fraction: this.diloco.syncS > 0 ? this.diloco.hiddenS / this.diloco.syncS : null,
            },
          }
        : {}),
      ...(this.pipeline ? { pipeline: this.pipeline } : {}),
      ...(this.ordersAhead ? { orders_ahead: this.ordersAhead } : {}),
      steps_skipped: this.stepsSkipped,
      left_out: this.leftOut,
      faults: this.faults,
      steps_redone: this.stepsRedone,
      ...(this.rolledBack.length ? { rolled_back_to: this.rolledBack } : {}),
      links: this.links,
      workers: workers.map((w) => ({ ...w, share: this.samplesDone > 0 ? w.samples / this.samplesDone : 0 })),
      run_dir: runDir,
      started_at: this.startedAt,
      ...(this.startup.summary ? { startup: this.startup.summary } : {}),
    };
  }
}
