/**
 * Orders ahead (README, "Orders ahead"): under sync, round t+1's orders go out as soon as
 * round t's have, before t's reports are in, so that no worker waits one control round
 * trip per step. A worker then holds two undecided rounds: t applied before its decision
 * (with a snapshot to undo it) and t+1; aborting t aborts t+1. Round t's decision rides on
 * the first orders sent after its reports (t+2's), or goes out alone as a quiet `decide`.
 * Shares rebalanced from t's reports take effect at t+2, one step later than without.
 */
export type OrdersAheadMode = "auto" | "on" | "off";

/** Rounds `auto` measures (after the first, which warms up) before it decides. */
export const AUTO_ROUNDS = 3;
/** `auto` orders ahead when the control round trip is above this fraction of a step. */
export const AUTO_THRESHOLD = 0.05;

/** One round as the coordinator saw it: orders out to the last report in, and the longest a worker was busy. */
export interface RoundTiming {
  wallS: number;
  busyS: number;
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** What the coordinator's round trip costs a step: the wall time no worker was busy for. */
export function controlShare(rounds: readonly RoundTiming[]): number {
  if (rounds.length === 0) return 0;
  const wall = median(rounds.map((r) => r.wallS));
  const gap = median(rounds.map((r) => Math.max(0, r.wallS - r.busyS)));
  return wall > 0 ? gap / wall : 0;
}

/** Whether to order ahead from now on: `on`, `off`, or `auto` once it measured enough rounds. */
export function ordersAheadOn(mode: OrdersAheadMode, rounds: readonly RoundTiming[]): boolean {
  if (mode !== "auto") return mode === "on";
  return rounds.length >= AUTO_ROUNDS && controlShare(rounds.slice(-AUTO_ROUNDS)) > AUTO_THRESHOLD;
}

export interface AheadQuestion {
  /** The round whose reports are awaited. */
  step: number;
  steps: number;
  evalEvery: number;
  checkpointEvery: number;
  /** The step after which slow workers may be left out (null: never). */
  leaveOutAfter: number | null;
  joinersWaiting: boolean;
  stopRequested: boolean;
}

/**
 * May round step+1 be ordered before round `step`'s reports are in? Only when nothing
 * runs between the two rounds that needs every worker decided (an evaluation, a
 * checkpoint, leaving out slow workers, admitting joiners, stopping) and step+1 exists.
 */
export function mayOrderAhead(q: AheadQuestion): boolean {
  const after = q.step + 1;
  if (after >= q.steps) return false;
  if (q.evalEvery > 0 && after % q.evalEvery === 0) return false;
  if (q.checkpointEvery > 0 && after % q.checkpointEvery === 0) return false;
  if (q.leaveOutAfter === q.step) return false;
  return !q.joinersWaiting && !q.stopRequested;
}
