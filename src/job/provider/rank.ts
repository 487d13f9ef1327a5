import type { CollectiveChoice, CollectiveTiming, WorkerInfo, WorkerStartup } from "../../protocol/messages.js";
import type { WorkerProcess } from "../../runtime/worker.js";
import { isGone, isLoaded, transition, viewState, type RankEvent, type RankState } from "./lifecycle.js";
import type { WorkerEvent } from "./types.js";

/**
 * One local rank of a job: its lifecycle (one explicit state, changed only by `on`), its
 * worker process, and the attempt its collectives belong to.
 */
export class LocalRank {
  #state: RankState = "spawning";
  worker: WorkerProcess | null = null;
  /** Its worker's description (from `ready`), once loaded. */
  info: WorkerInfo | null = null;
  /** Times its worker was started again after dying. */
  restarts = 0;
  /** The latest round attempt ordered (with orders ahead, the worker may still run the one before). */
  attempt = 0;
  /** The first attempt still alive: an abort ends every attempt before it, and their collectives are dropped. */
  liveFrom = 0;
  /** Ring bytes sent since its last report. */
  bytesSinceReport = 0;
  /** How each live round's all-reduces run (its order's choice; null: the ring), by attempt: with orders ahead, two rounds may be live. */
  collective = new Map<number, CollectiveChoice | null>();
  /** The all-reduces it ran since its last report. */
  collectives: CollectiveTiming[] = [];
  /** Its collectives, served one at a time in order; reports wait for them. */
  queue: Promise<void> = Promise.resolve();
  /** Why it left, for a `left` state. */
  leftBecause: string | undefined;
  /** Its worker's start: a warm spare or a cold one, and when `init` was sent (performance.now()). */
  startup: { warm: boolean; initAt: number } | null = null;
  /** The view state, restarts and pid last reported in a `worker` event. */
  #reported = "";

  constructor(
    readonly rank: number,
    readonly device: string,
    private readonly report: (event: Omit<WorkerEvent, "type" | "job">) => void,
  ) {}

  get state(): RankState {
    return this.#state;
  }

  get loaded(): boolean {
    return isLoaded(this.#state);
  }

  get gone(): boolean {
    return isGone(this.#state);
  }

  /** The one transition; the view hears of it when its state, restarts or pid changed. */
  on(event: RankEvent, detail?: string): void {
    this.#state = transition(this.#state, event);
    if (this.#state === "left" && detail) this.leftBecause = detail;
    this.announce();
  }

  /** A new worker process (first start or restart): a `worker` event names its pid. */
  announce(): void {
    const state = viewState(this.#state);
    const pid = this.worker?.pid ?? null;
    const key = `${state} ${this.restarts} ${pid}`;
    if (key === this.#reported) return;
    this.#reported = key;
    this.report({ rank: this.rank, device: this.device, state, restarts: this.restarts, pid, ...(state === "left" && this.leftBecause ? { detail: this.leftBecause } : {}) });
  }

  /** Where its worker's start went, now that it is ready: waiting for torch's import (none for a spare that had it), then init. */
  startupFigures(worker: WorkerProcess): WorkerStartup {
    const now = performance.now();
    const initAt = this.startup?.initAt ?? worker.spawnedAt;
    const imported = worker.startedAt ?? initAt;
    const importS = this.startup?.warm ? Math.max(0, imported - initAt) : imported - worker.spawnedAt;
    return { warm: this.startup?.warm ?? false, import_s: importS / 1000, load_s: (now - Math.max(initAt, imported)) / 1000 };
  }

  /** Its worker died and starts again: nothing of the old one carries over (the new worker's `announce` tells the view). */
  restart(): void {
    this.restarts += 1;
    this.worker = null;
    this.info = null;
    this.attempt = 0;
    this.liveFrom = 0;
    this.collective.clear();
    this.collectives = [];
    this.queue = Promise.resolve();
    this.#state = transition(this.#state, "crashed");
  }
}
