import type { JobConfig } from "../../config/schema.js";
import type { SyncStrategy } from "../../strategy/sync.js";
import type { StatusLevel, TrainEvent } from "../events.js";
import type { RunDir } from "../runDir.js";
import type { CollectivePlanner } from "./collective.js";
import type { Commits } from "./commit.js";
import type { Exchanges } from "./exchanges.js";
import type { Membership } from "./membership.js";
import type { Phase } from "./phase.js";
import type { Providers } from "./providers.js";
import type { Tally } from "./tally.js";

/**
 * The parts of a running job that the coordinator's phases work with. Each is a typed
 * value with its own transitions (Membership.reform, Tally.recordStep, Commits.decide...);
 * this record only hands them over.
 */
export interface Run {
  readonly config: JobConfig;
  readonly providers: Providers;
  readonly exchanges: Exchanges;
  readonly membership: Membership;
  readonly commits: Commits;
  readonly tally: Tally;
  readonly strategy: SyncStrategy;
  readonly dir: RunDir;
  /** Ring or direct for each round's all-reduces (absent: the ring). */
  readonly collective?: CollectivePlanner;
  /** Pipeline parallelism: where each stage's layers start (null: the task's build_stages; undefined: no pipeline). */
  readonly pipelineBounds?: number[] | null;
  /** The phase now, and the one transition into another. */
  phase(): Phase;
  enter(phase: Phase): void;
  status(message: string, level?: StatusLevel): void;
  report(event: TrainEvent): void;
}

/** Workers import torch and build the datasets before they are ready: allow for a slow first start. */
export const READY_TIMEOUT_MS = 300_000;
export const STEP_TIMEOUT_MS = 600_000;
export const RING_TIMEOUT_MS = 60_000;
/** Survivors answering a decision during recovery. */
export const RECOVERY_TIMEOUT_MS = 60_000;
