/**
 * Alpha-beta cost model of an all-reduce (sum) of `bytes` among `n` members, each with one
 * uplink (single port: a member's sends share its uplink; its downlink is never the
 * bottleneck for these balanced schedules). Pure: the coordinator chooses an algorithm
 * per collective from it, and scripts/bench-sim.mjs checks it against a message-level
 * simulation (src/collective/sim.ts).
 *
 *   alpha  one-way latency of a message between two members (seconds)
 *   beta   seconds per byte on a member's uplink
 *   hop    fixed software cost per message (framing, a syscall, scheduling) on the
 *          member's CPU; it serialises with the member's other messages.
 *
 * Formulas (s = bytes, c = CHUNK):
 *   ring        2(n-1) phases, each sends s/n in chunks that are forwarded as soon as
 *               summed, so a phase takes the longer of its segment's transmission and the
 *               chunk's latency (c*beta + alpha + hop); the last chunk's latency once more.
 *   direct      reduce-scatter straight to owners, then all-gather from owners: 2 phases,
 *               each n-1 messages of s/n through one uplink and (n-1) hops on the CPU.
 *   halving_doubling  recursive halving then doubling among p = 2^floor(log2 n):
 *               2 log2 p steps of s/2 .. s/p; for n != p the n-p extra members first
 *               fold their whole vector into a partner and get the result back (2 more
 *               steps of s).
 *   two_level   groups of g (g divides n): ring reduce-scatter within the group, direct
 *               all-reduce of each 1/g shard among the n/g groups, ring all-gather within
 *               the group. g is the cheapest divisor (predictTwoLevelS takes it and an
 *               intra-group link for groups formed by RTT).
 */

export type AllReduceAlgorithm = "ring" | "direct" | "halving_doubling" | "two_level";

export const ALL_REDUCE_ALGORITHMS: readonly AllReduceAlgorithm[] = ["ring", "direct", "halving_doubling", "two_level"];

export interface LinkCosts {
  /** one-way latency of a message between two members, seconds */
  alphaS: number;
  /** seconds per byte on a member's uplink (1 / rate) */
  betaSPerByte: number;
  /** fixed software cost per message hop measured on this machine, seconds (default 0) */
  hopS?: number;
}

export interface AllReduceChoice {
  algorithm: AllReduceAlgorithm;
  predictedS: Record<string, number>;
}

/** Wire bytes of one ring chunk (DEFAULT_CHUNK_BYTES in protocol/frames.ts). */
export const CHUNK_BYTES = 256 * 1024;

function check(n: number, bytes: number, link: LinkCosts): void {
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`members must be a positive integer, got ${n}`);
  if (!(bytes >= 0) || !Number.isFinite(bytes)) throw new RangeError(`bytes must be finite and >= 0, got ${bytes}`);
  for (const [k, v] of [
    ["alphaS", link.alphaS],
    ["betaSPerByte", link.betaSPerByte],
    ["hopS", link.hopS ?? 0],
  ] as const) {
    if (!(v >= 0) || !Number.isFinite(v)) throw new RangeError(`${k} must be finite and >= 0, got ${v}`);
  }
}

const hopOf = (link: LinkCosts) => link.hopS ?? 0;

/** Ring reduce-scatter or all-gather alone: `phases` phases of segments of `segment` bytes. */
function ringPhasesS(phases: number, segment: number, link: LinkCosts): number {
  if (phases === 0) return 0;
  const chunk = Math.min(segment, CHUNK_BYTES);
  const chunkLatency = chunk * link.betaSPerByte + link.alphaS + hopOf(link);
  const chunks = Math.max(1, Math.ceil(segment / CHUNK_BYTES));
  const phase = Math.max(segment * link.betaSPerByte, chunkLatency, chunks * hopOf(link));
  // Each phase is paced by the longer of the two; the last phase's tail arrives a chunk latency later.
  return (phases - 1) * phase + Math.max(segment * link.betaSPerByte, chunks * hopOf(link)) + link.alphaS + hopOf(link);
}

/** One direct phase: n-1 messages of `slice` bytes from every member through its uplink. */
function directPhaseS(n: number, slice: number, link: LinkCosts): number {
  if (n <= 1) return 0;
  const messages = (n - 1) * Math.max(1, Math.ceil(slice / CHUNK_BYTES));
  return link.alphaS + hopOf(link) + Math.max((n - 1) * slice * link.betaSPerByte, messages * hopOf(link));
}

function ringS(n: number, bytes: number, link: LinkCosts): number {
  return 2 * ringPhasesS(n - 1, bytes / n, link);
}

function directS(n: number, bytes: number, link: LinkCosts): number {
  return 2 * directPhaseS(n, bytes / n, link);
}

/** One point-to-point step of `s` bytes (sent whole, then the next step starts). */
function stepS(s: number, link: LinkCosts): number {
  return link.alphaS + hopOf(link) * Math.max(1, Math.ceil(s / CHUNK_BYTES)) + s * link.betaSPerByte;
}

function halvingDoublingS(n: number, bytes: number, link: LinkCosts): number {
  if (n <= 1) return 0;
  const k = Math.floor(Math.log2(n));
  const p = 2 ** k;
  let t = 0;
  for (let i = 1; i <= k; i++) t += 2 * stepS(bytes / 2 ** i, link);
  if (n !== p) t += 2 * stepS(bytes, link);
  return t;
}

/** Two-level all-reduce with groups of `g` members (g divides n); `intra` links within a group. */
export function predictTwoLevelS(n: number, bytes: number, link: LinkCosts, g: number, intra: LinkCosts = link): number {
  check(n, bytes, link);
  if (!Number.isInteger(g) || g < 1 || n % g !== 0) throw new RangeError(`group size ${g} does not divide ${n}`);
  const m = n / g;
  return 2 * ringPhasesS(g - 1, bytes / g, intra) + 2 * directPhaseS(m, bytes / g / m, link);
}

/** The group size the model finds cheapest for two_level (a divisor of n; 1 is direct, n is ring). */
export function twoLevelGroupSize(n: number, bytes: number, link: LinkCosts): number {
  let best = 1;
  let bestS = Number.POSITIVE_INFINITY;
  for (let g = 1; g <= n; g++) {
    if (n % g !== 0) continue;
    const s = predictTwoLevelS(n, bytes, link, g);
    if (s < bestS) [best, bestS] = [g, s];
  }
  return best;
}

/** Predicted seconds of one all-reduce of `bytes` among `n` members with `algorithm`. */
export function predictAllReduceS(algorithm: AllReduceAlgorithm, n: number, bytes: number, link: LinkCosts): number {
  check(n, bytes, link);
  if (n === 1) return 0;
  switch (algorithm) {
    case "ring":
      return ringS(n, bytes, link);
    case "direct":
      return directS(n, bytes, link);
    case "halving_doubling":
      return halvingDoublingS(n, bytes, link);
    case "two_level":
      return predictTwoLevelS(n, bytes, link, twoLevelGroupSize(n, bytes, link));
    default:
      throw new RangeError(`unknown all-reduce algorithm ${String(algorithm)}`);
  }
}

/** Single-port alpha-beta lower bound: alpha*ceil(log2 n) + 2(n-1)/n * bytes * beta. */
export function allReduceLowerBoundS(n: number, bytes: number, link: LinkCosts): number {
  check(n, bytes, link);
  if (n === 1) return 0;
  return link.alphaS * Math.ceil(Math.log2(n)) + ((2 * (n - 1)) / n) * bytes * link.betaSPerByte;
}

/** The cheapest of `available` (ties go to the earlier in the list). */
export function chooseAllReduce(n: number, bytes: number, link: LinkCosts, available: readonly AllReduceAlgorithm[]): AllReduceChoice {
  if (available.length === 0) throw new RangeError("no all-reduce algorithm available");
  const predictedS: Record<string, number> = {};
  let algorithm = available[0];
  for (const a of available) {
    predictedS[a] = predictAllReduceS(a, n, bytes, link);
    if (predictedS[a] < predictedS[algorithm]) algorithm = a;
  }
  return { algorithm, predictedS };
}
