import type { Fault } from "./errors.js";

export interface QuorumInput {
  /** Ranks in the ring now, in ring order. */
  active: readonly number[];
  /** Ranks known lost (faults not yet recovered from). */
  lost: readonly number[];
  /** Ranks loaded and waiting to enter the ring (restarted, or their provider came back). */
  joiners: readonly number[];
  minWorkers: number;
  /** How long the job may wait below min_workers for providers to come (back). */
  waitMs: number;
  /** Date.now() when the job first had too few workers, or null. */
  shortSince: number | null;
  /** What the members were lost to, for the reason (e.g. `worker died (...)`). */
  cause?: string;
}

export type Quorum =
  /** Go on with `members` (ring order): `dropped` leave the ring, `joining` enter it. */
  | { decision: "quorum"; members: number[]; dropped: number[]; joining: number[] }
  /** Too few: go on without `dropped`, and wait until `until` for more to join. */
  | { decision: "wait"; reason: string; until: number; dropped: number[] }
  | { decision: "fail"; reason: string; hint: string };

/**
 * Who trains next, as a pure function of the membership and the clock (like torchft's
 * lighthouse `quorum_compute`): the lost leave, joiners enter, and below `min_workers` the
 * job waits for providers up to `wait_s`, then fails. Only a member that stays holds the
 * training state, so with none left the job fails whatever joins.
 */
export function quorum(input: QuorumInput, now: number): Quorum {
  const lost = new Set(input.lost);
  const after = input.cause ? ` after ${input.cause}` : "";
  const dropped = input.active.filter((r) => lost.has(r));
  const stay = input.active.filter((r) => !lost.has(r));
  if (stay.length === 0) {
    return { decision: "fail", reason: `No worker left${after}: none holds the training state`, hint: "Continue from the last checkpoint with `nimble train --resume RUN_DIR`." };
  }
  const joining = input.joiners.filter((r) => !lost.has(r) && !stay.includes(r)).sort((a, b) => a - b);
  const members = [...stay, ...joining].sort((a, b) => a - b);
  if (members.length >= input.minWorkers) return { decision: "quorum", members, dropped, joining };
  const left = `${stay.length} worker${stay.length === 1 ? "" : "s"} left${after}`;
  const since = input.shortSince ?? now;
  if (now <= since + input.waitMs) {
    return { decision: "wait", reason: `${left}, faults.min_workers is ${input.minWorkers}`, until: since + input.waitMs, dropped };
  }
  return {
    decision: "fail",
    reason: `${left}, and no provider came back within ${input.waitMs / 1000} s; faults.min_workers is ${input.minWorkers}`,
    hint: "Start more providers and run `nimble train --resume RUN_DIR`, or lower faults.min_workers.",
  };
}

/**
 * The job's membership: the ring's members by epoch, workers waiting to join, and the
 * faults noticed and not yet recovered from. Changed only by the transitions below.
 */
export class Membership {
  #active: number[];
  #epoch = 0;
  readonly #joiners = new Set<number>();
  /** Ranks some fault already named since they last (re)joined: later news of them is no new fault. */
  readonly #declaredLost = new Set<number>();
  #faults: Fault[] = [];

  constructor(members: readonly number[]) {
    this.#active = [...members];
  }

  get active(): readonly number[] {
    return this.#active;
  }

  get epoch(): number {
    return this.#epoch;
  }

  get joiners(): readonly number[] {
    return [...this.#joiners].sort((a, b) => a - b);
  }

  get pendingFaults(): readonly Fault[] {
    return this.#faults;
  }

  isActive(rank: number): boolean {
    return this.#active.includes(rank);
  }

  /** A fault noticed; false when it only retells the loss of ranks already declared lost. */
  noteFault(fault: Fault): boolean {
    if (fault.ranks.length > 0 && fault.ranks.every((r) => this.#declaredLost.has(r))) return false;
    for (const r of fault.ranks) this.#declaredLost.add(r);
    this.#faults.push(fault);
    return true;
  }

  /** The faults to recover from now (they are then no longer pending). */
  takeFaults(): Fault[] {
    const faults = this.#faults;
    this.#faults = [];
    return faults;
  }

  joinerReady(rank: number): void {
    if (!this.#active.includes(rank)) this.#joiners.add(rank);
  }

  joinerGone(rank: number): void {
    this.#joiners.delete(rank);
  }

  /** The ring re-forms with `members` (a new epoch): leavers and entrants settled. */
  reform(members: readonly number[]): number {
    for (const r of members) {
      if (!this.#active.includes(r)) this.#declaredLost.delete(r);
      this.#joiners.delete(r);
    }
    this.#active = [...members];
    this.#epoch += 1;
    return this.#epoch;
  }
}
