import type { WorkerStartup } from "../../protocol/messages.js";

/**
 * Where the time from `nimble train` starting to its first completed step went, phase by
 * phase, on the clock of this process (performance.now(): since it started, Node's own
 * start-up included in the first phase). summary.json keeps it as `startup`.
 */
export type StartupPhase =
  | "config" // Node's start, the config loaded and validated, identity, task package, requirements
  | "python" // the workers' Python environment found (local providers only)
  | "local_providers" // local providers started and listening (local providers only)
  | "connect" // providers connected and authenticated, ranks assigned
  | "workers" // job spec sent; every worker started (torch imported), task, data and model loaded
  | "ring" // the first ring linked
  | "sync" // rank 0's weights broadcast (or a checkpoint loaded)
  | "first_step"; // the first step's orders to its completion

export interface StartupSummary {
  /** Seconds from this process's start to the first completed step. */
  first_step_s: number;
  phases: Partial<Record<StartupPhase, number>>;
  /** Per rank: a warm spare or a cold start, and its own seconds waiting for torch and loading. */
  workers: ({ rank: number } & WorkerStartup)[];
}

export class StartupClock {
  readonly #phases: Partial<Record<StartupPhase, number>> = {};
  #last = 0;
  #workers: StartupSummary["workers"] = [];
  #done: StartupSummary | null = null;

  /** `phase` ended now: it took the time since the previous mark. */
  mark(phase: StartupPhase, now = performance.now()): void {
    if (this.#done) return;
    this.#phases[phase] = (this.#phases[phase] ?? 0) + (now - this.#last);
    this.#last = now;
  }

  workers(figures: StartupSummary["workers"]): void {
    this.#workers = [...figures].sort((a, b) => a.rank - b.rank);
  }

  /** The first step completed: the figures are final (later marks are ignored). */
  finish(now = performance.now()): StartupSummary {
    if (this.#done) return this.#done;
    this.mark("first_step", now);
    const phases = Object.fromEntries(Object.entries(this.#phases).map(([k, ms]) => [k, round(ms / 1000)]));
    this.#done = { first_step_s: round(now / 1000), phases, workers: this.#workers };
    return this.#done;
  }

  get summary(): StartupSummary | null {
    return this.#done;
  }
}

/** One line for the run's log: the total, its phases, and how many workers were warm. */
export function startupLine(s: StartupSummary): string {
  const phases = Object.entries(s.phases).map(([k, v]) => `${k.replace("_", " ")} ${v.toFixed(2)}`).join(", ");
  const warm = s.workers.filter((w) => w.warm).length;
  return `First step ${s.first_step_s.toFixed(2)} s after start (${phases}); ${warm} of ${s.workers.length} worker${s.workers.length === 1 ? "" : "s"} warm`;
}

const round = (s: number) => Math.round(s * 1000) / 1000;
