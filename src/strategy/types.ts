import type { FromWorker } from "../protocol/workerOps.js";

/**
 * A training strategy on the coordinator side (DESIGN.md, "One round"): it plans each
 * round for the members of the ring, folds the round's reports into one result, and
 * reacts to members changing. Pure: no sockets, no clocks; the coordinator's run loop
 * sends what it plans and hands it what comes back. The worker side of the same strategy
 * lives in python-runtime/nimble_worker/strategies/.
 */
export interface Strategy<Plan extends RoundPlan = RoundPlan, Result extends RoundResult = RoundResult, Report = RoundReport> {
  readonly name: string;
  /** Plan round `round` for `members` (ranks in ring order; `worldSize`: every rank the job has had). */
  plan(round: number, members: readonly number[], worldSize: number, opts: PlanOptions): Plan;
  /** Fold the round's reports, one per member, into its result; throws when replicas disagree. */
  fold(plan: Plan, reports: ReadonlyMap<number, Report>): Result;
  /** The ring's members changed: `members` are the new ones in ring order. */
  membersChanged(change: MembersChange): void;
  /** State of its own to keep in a checkpoint (null: none; it is rebuilt by measuring). */
  state(): Record<string, unknown> | null;
  load(state: Record<string, unknown>): void;
}

export interface PlanOptions {
  /** Replicas compare parameter hashes in this round. */
  wantHash: boolean;
}

export interface RoundPlan {
  round: number;
  members: readonly number[];
  wantHash: boolean;
}

/** What a worker reports of a round (sync: its step report), with the ring bytes its provider counted. */
export type RoundReport = Omit<Extract<FromWorker, { op: "step_done" }>, "op"> & { rank: number; bytes_sent: number };

export interface RoundResult {
  round: number;
  /** Every replica skipped the update (non-finite values): the round commits, unchanged. */
  skipped: boolean;
  /** Mean training loss over the round's samples (meaningless when skipped). */
  loss: number;
  samples: number;
  lr: number;
  bytesSent: number;
  uncompressedBytes: number;
}

export interface MembersChange {
  members: readonly number[];
  /** Ranks that left (lost or left out) and ranks that entered (joined, restarted). */
  left: readonly number[];
  joined: readonly number[];
}
