/**
 * Plain-text progress for non-terminals (CI logs, pipes): one human line per
 * noteworthy event, step lines throttled so that a long run stays readable.
 */
import type { DilocoFigures, Reporter, StatusLevel, TrainEvent, WorkerRow } from "../job/events.js";
import { formatBytes, formatCount, formatDuration, formatMetric, formatRate, formatRatio, formatSci } from "./format.js";
import { formatPipelineLine } from "./pipeline.js";

/** Anything with a string `write` (process.stdout, a file stream, a test buffer). */
export interface TextSink {
  write(chunk: string): unknown;
}

export interface PlainReporterOptions {
  /** Where lines go. Default process.stdout. */
  out?: TextSink;
  /** Milliseconds clock, injectable for tests. Default Date.now. */
  now?: () => number;
  /** Print a step line at least this often (ms of wall time) while steps arrive. Default 2000. */
  intervalMs?: number;
  /** quiet: warnings, errors and the summary; verbose: also every step and debug detail. Default normal. */
  verbosity?: Verbosity;
  /** Write the run's error too (train.log). False on a terminal: the command prints it once, with its hint, on stderr. Default true. */
  errors?: boolean;
}

/** How much `--quiet` / `--verbose` let through. */
export type Verbosity = "quiet" | "normal" | "verbose";

const LOST_STATES = new Set(["lost", "failed", "left out"]);

type StepEvent = Extract<TrainEvent, { type: "step" }>;
type DoneEvent = Extract<TrainEvent, { type: "done" }>;

export function formatStepLine(e: StepEvent): string {
  const width = String(e.steps).length;
  const n = e.workers.length;
  return [
    `step ${String(e.step).padStart(width)}/${e.steps}`,
    `loss ${formatMetric(e.loss)}`,
    `lr ${formatSci(e.lr)}`,
    `${formatRate(e.samples_per_s)} samples/s`,
    `sent ${formatBytes(e.bytes_sent)} (${formatRatio(e.compression_ratio)})`,
    ...(e.diloco ? [formatDiloco(e.diloco)] : []),
    `[${n} worker${n === 1 ? "" : "s"}]`,
  ].join("  ");
}

/** `round 3 (fragment 1) outer lr 7.0e-1, sync 0.12 s, 80% hidden`. */
export function formatDiloco(d: DilocoFigures): string {
  const hidden = d.comm_s + d.hidden_s > 0 ? `, ${Math.round((100 * d.hidden_s) / (d.comm_s + d.hidden_s))}% hidden` : "";
  return `round ${d.round + 1} (fragment ${d.fragment}) outer lr ${formatSci(d.outer_lr)}, sync ${(d.comm_s + d.hidden_s).toFixed(2)} s${hidden}`;
}

export function formatMetrics(metrics: Record<string, number>): string {
  return Object.entries(metrics)
    .map(([k, v]) => `${k} ${typeof v === "number" ? formatMetric(v) : String(v)}`)
    .join("  ");
}

export function formatEvalLine(step: number, metrics: Record<string, number>): string {
  return `eval @ step ${step}: ${formatMetrics(metrics)}`;
}

export function formatWorkerLine(w: WorkerRow): string {
  return `worker ${w.id} (rank ${w.rank}, ${w.device}): ${w.state}`;
}

/** What the reporter saw of the run, used where the `done` summary leaves a value out. */
export interface RunTotals {
  step?: StepEvent;
  eval?: { step: number; metrics: Record<string, number> };
}

function num(v: unknown): number | undefined {
  return typeof v === "number" && Number.isFinite(v) ? v : undefined;
}

/**
 * The closing summary. Reads `steps`, `samples`, `wall_s`, `final_loss` (or `loss`) and
 * `eval` (a metrics mapping) from the done event's summary, falling back to the last
 * step and eval events seen.
 */
export function formatSummary(e: DoneEvent, seen: RunTotals): string[] {
  const s = e.summary ?? {};
  const steps = num(s.steps) ?? seen.step?.step;
  const samples = num(s.samples) ?? seen.step?.samples;
  const wall = num(s.wall_s) ?? seen.step?.wall_s;
  const loss = num(s.final_loss) ?? num(s.loss) ?? seen.step?.loss;
  const evalMetrics =
    s.eval && typeof s.eval === "object" && !Array.isArray(s.eval)
      ? (Object.fromEntries(
          Object.entries(s.eval as Record<string, unknown>).filter(([, v]) => typeof v === "number"),
        ) as Record<string, number>)
      : seen.eval?.metrics;

  const parts: string[] = [];
  if (steps !== undefined) parts.push(`${formatCount(steps)} steps`);
  if (samples !== undefined) parts.push(`${formatCount(samples)} samples`);
  let head = `done${wall !== undefined ? ` in ${formatDuration(wall)}` : ""}`;
  if (parts.length) head += `: ${parts.join(", ")}`;
  // Training throughput (time in steps) when the summary has it: wall time includes start-up.
  const rate = num(s.samples_per_s) ?? (wall && samples ? samples / wall : undefined);
  if (rate !== undefined) head += ` (${formatRate(rate)} samples/s${num(s.samples_per_s) !== undefined ? " while training" : ""})`;
  const lines = [head];
  if (loss !== undefined) lines.push(`  final loss ${formatMetric(loss)}`);
  if (evalMetrics && Object.keys(evalMetrics).length > 0) lines.push(`  eval: ${formatMetrics(evalMetrics)}`);
  lines.push(`  run dir ${e.run_dir}`);
  return lines;
}

export class PlainReporter implements Reporter {
  private readonly out: TextSink;
  private readonly now: () => number;
  private readonly intervalMs: number;
  private readonly verbosity: Verbosity;
  private readonly errors: boolean;
  private lastPrintAt = -Infinity;
  private lastPrintedStep = 0;
  private pendingStep: StepEvent | undefined;
  private readonly seen: RunTotals = {};
  private readonly workerStates = new Map<string, string>();
  private closed = false;

  constructor(options: PlainReporterOptions = {}) {
    this.out = options.out ?? process.stdout;
    this.now = options.now ?? Date.now;
    this.intervalMs = options.intervalMs ?? 2000;
    this.verbosity = options.verbosity ?? "normal";
    this.errors = options.errors ?? true;
  }

  /** Whether a status line of this level is shown at this verbosity. */
  private shows(level: StatusLevel): boolean {
    if (level === "warn") return true;
    if (level === "debug") return this.verbosity === "verbose";
    return this.verbosity !== "quiet";
  }

  handle(event: TrainEvent): void {
    if (this.closed) return;
    switch (event.type) {
      case "status":
        if (this.shows(event.level ?? "info")) this.line(event.message);
        break;
      case "run":
        // The coordinator's own status line names the run directory.
        break;
      case "log":
        if (this.shows(event.level ?? "info")) this.line(`[${event.source}] ${event.line}`);
        break;
      case "workers":
        this.workerChanges(event.workers);
        break;
      case "step":
        this.workerChanges(event.workers);
        this.seen.step = event;
        if (this.verbosity === "quiet") break;
        if (this.shouldPrint(event)) this.printStep(event);
        else this.pendingStep = event;
        break;
      case "eval":
        this.flushStep();
        this.seen.eval = { step: event.step, metrics: event.metrics };
        if (this.shows("info")) this.line(formatEvalLine(event.step, event.metrics));
        break;
      case "checkpoint":
        this.flushStep();
        if (this.shows("info")) this.line(`checkpoint @ step ${event.step}: ${event.path}`);
        break;
      case "done":
        this.flushStep();
        for (const l of formatSummary(event, this.seen)) this.line(l);
        break;
      case "error":
        this.flushStep();
        if (this.errors) this.line(`error: ${event.message}`);
        break;
    }
  }

  close(): void {
    if (this.closed) return;
    this.flushStep();
    this.closed = true;
  }

  private shouldPrint(e: StepEvent): boolean {
    if (this.lastPrintedStep === 0 || this.verbosity === "verbose") return true;
    if (e.step >= e.steps) return true;
    if (this.now() - this.lastPrintAt >= this.intervalMs) return true;
    if (e.steps > 0) {
      const tenth = (s: number) => Math.floor((s * 10) / e.steps);
      if (tenth(e.step) > tenth(this.lastPrintedStep)) return true;
    }
    return false;
  }

  private printStep(e: StepEvent): void {
    this.line(formatStepLine(e));
    if (e.pipeline && e.pipeline.length > 0) this.line(formatPipelineLine(e.pipeline));
    this.lastPrintAt = this.now();
    this.lastPrintedStep = e.step;
    this.pendingStep = undefined;
  }

  /** Before an eval, checkpoint or the end: show where training stands, if not shown. */
  private flushStep(): void {
    if (this.verbosity === "quiet") return;
    if (this.pendingStep && this.pendingStep.step !== this.lastPrintedStep) this.printStep(this.pendingStep);
    this.pendingStep = undefined;
  }

  private workerChanges(workers: WorkerRow[]): void {
    for (const w of workers) {
      if (this.workerStates.get(w.id) === w.state) continue;
      this.workerStates.set(w.id, w.state);
      if (this.verbosity !== "quiet" || LOST_STATES.has(w.state)) this.line(formatWorkerLine(w));
    }
  }

  private line(s: string): void {
    this.out.write(s + "\n");
  }
}
