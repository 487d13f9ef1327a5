/**
 * Message schedules of the all-reduce algorithms for simEngine.ts, at chunk level. Pure.
 * Buffers are float32 (bytes / 4 elements), cut as the ring cuts them (segmentBounds), each
 * message a chunk of at most chunkBytes payload plus a CHUNK_HEADER_BYTES header.
 *
 *   ring              ring.ts's schedule: 2(n-1) phases, rank r sends segment (r - p) mod n
 *                     to r+1; chunk c of phase p+1 leaves once chunk c of phase p is summed.
 *   direct            every member sends slice o to its owner o (round-robin over owners,
 *                     starting at its right-hand neighbour), the owner sends each reduced
 *                     chunk to every other member once all n-1 contributions of it are in.
 *   halving_doubling  recursive halving (reduce-scatter) then doubling (all-gather) among
 *                     p = 2^floor(log2 n); a step starts when the previous one's receipts
 *                     are all in. The n-p members above p first send their whole vector to
 *                     member (i - p) and get the result back from it at the end.
 *   two_level         groups of g consecutive members: ring reduce-scatter in the group,
 *                     direct all-reduce of the owned segment among the n/g members with the
 *                     same place in their groups, ring all-gather in the group.
 */
import { CHUNK_HEADER_BYTES, DEFAULT_CHUNK_BYTES } from "../protocol/frames.js";
import type { AllReduceAlgorithm } from "./costModel.js";
import { segmentBounds } from "./ring.js";
import { Schedule } from "./simEngine.js";

export interface ScheduleOptions {
  /** wire payload bytes per chunk (default DEFAULT_CHUNK_BYTES) */
  chunkBytes?: number;
  /** two_level: members per group (must divide n; default the divisor nearest sqrt(n)) */
  groupSize?: number;
}

const mod = (a: number, n: number) => ((a % n) + n) % n;

/** Chunk element counts of a run of `len` elements. */
function chunks(len: number, per: number): number[] {
  const out: number[] = [];
  for (let left = len; left > 0; left -= per) out.push(Math.min(per, left));
  return out;
}

const wire = (elements: number) => CHUNK_HEADER_BYTES + 4 * elements;

/**
 * Ring phases [from, to) over `members` (global ranks, in ring order) on segments `segs`.
 * `entry[k]` is the gate that releases member k's first phase (0: at once) and applies to
 * every chunk of it; later phases are chained chunk by chunk. Returns, per member, the gate
 * that opens when its last phase's receipts are in (0 when it received nothing).
 */
function ringPhases(s: Schedule, members: number[], segs: number[], per: number, from: number, to: number, entry: number[]): number[] {
  const g = members.length;
  const done = new Array<number>(g).fill(0);
  if (g === 1 || from >= to) return entry.slice();
  // gates[k][c]: releases chunk c of member k's current phase.
  let gates: number[][] = members.map((_, k) => chunks(segs[mod(k - from, g)], per).map(() => entry[k]));
  for (let p = from; p < to; p++) {
    const next: number[][] = members.map(() => []);
    for (let k = 0; k < g; k++) {
      const to_ = (k + 1) % g;
      const cs = chunks(segs[mod(k - p, g)], per);
      const last = p === to - 1;
      // The receiver's phase-p+1 chunk c is this chunk c, summed; after the last phase a
      // member's completion gate counts all its receipts.
      const finalGate = last && cs.length > 0 ? s.gate(cs.length, members[to_]) : 0;
      if (last) done[to_] = finalGate;
      cs.forEach((count, c) => {
        const signal = last ? finalGate : s.gate(1, members[to_]);
        s.message(members[k], members[to_], wire(count), gates[k][c], signal);
        if (!last) next[to_][c] = signal;
      });
    }
    gates = next;
  }
  return done;
}

function ringSchedule(n: number, elements: number, per: number): Schedule {
  const s = new Schedule(n);
  const segs = segmentBounds(elements, n).map((b) => b.end - b.start);
  ringPhases(s, range(n), segs, per, 0, 2 * (n - 1), new Array(n).fill(0));
  return s;
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i);

/**
 * Direct all-reduce of a `len`-element run among `members`, each member k's part released
 * by entry[k]. Returns per member the gate that opens when it holds the whole reduced run.
 */
function directPhases(s: Schedule, members: number[], len: number, per: number, entry: number[]): number[] {
  const m = members.length;
  if (m === 1) return entry.slice();
  const slices = segmentBounds(len, m).map((b) => chunks(b.end - b.start, per));
  // owned[o][c]: gate of owner o's chunk c, open when its m-1 contributions are in.
  const owned = slices.map((cs, o) => cs.map(() => s.gate(m - 1, members[o])));
  const maxChunks = Math.max(...slices.map((cs) => cs.length));
  for (let c = 0; c < maxChunks; c++) {
    for (let k = 0; k < m; k++) {
      for (let j = 1; j < m; j++) {
        const o = (k + j) % m;
        if (c < slices[o].length) s.message(members[k], members[o], wire(slices[o][c]), entry[k], owned[o][c]);
      }
    }
  }
  // Each member's completion: every other owner's chunks in.
  const received = members.map((_, k) => slices.reduce((sum, cs, o) => sum + (o === k ? 0 : cs.length), 0));
  const done = received.map((r, k) => (r > 0 ? s.gate(r, members[k]) : entry[k]));
  for (let o = 0; o < m; o++) {
    slices[o].forEach((count, c) => {
      for (let j = 1; j < m; j++) {
        const d = (o + j) % m;
        s.message(members[o], members[d], wire(count), owned[o][c], done[d] === entry[d] ? -1 : done[d]);
      }
    });
  }
  return done;
}

function halvingDoublingSchedule(n: number, elements: number, per: number): Schedule {
  const s = new Schedule(n);
  const k = Math.floor(Math.log2(n));
  const p = 2 ** k;
  // Each step sends at least one (possibly empty) message, so every step has a receipt to wait on.
  const send = (from: number, to: number, len: number, release: number): number => {
    const cs = chunks(len, per);
    if (cs.length === 0) cs.push(0);
    const gate = s.gate(cs.length, to);
    for (const count of cs) s.message(from, to, wire(count), release, gate);
    return gate;
  };
  // gate[i]: what member i < p waits on before its next step.
  const gate = new Array<number>(p).fill(0);
  for (let e = p; e < n; e++) gate[e - p] = send(e, e - p, elements, 0);
  // Recursive halving: at step j partners differ in bit (k-1-j); the lower keeps the lower half.
  const lo = new Array<number>(p).fill(0);
  const hi = new Array<number>(p).fill(elements);
  const history: Array<{ lo: number[]; hi: number[] }> = [];
  for (let j = 0; j < k; j++) {
    const bit = 1 << (k - 1 - j);
    const nextGate = gate.slice();
    history.push({ lo: lo.slice(), hi: hi.slice() });
    for (let i = 0; i < p; i++) {
      const mid = lo[i] + Math.floor((hi[i] - lo[i]) / 2);
      const keepLow = (i & bit) === 0;
      // i sends the half it does not keep; its partner's gate counts these receipts.
      nextGate[i ^ bit] = send(i, i ^ bit, keepLow ? hi[i] - mid : mid - lo[i], gate[i]);
    }
    for (let i = 0; i < p; i++) {
      const mid = lo[i] + Math.floor((hi[i] - lo[i]) / 2);
      if ((i & bit) === 0) hi[i] = mid;
      else lo[i] = mid;
    }
    gate.splice(0, p, ...nextGate);
  }
  // Recursive doubling: the steps in reverse, each member sending the range it holds.
  for (let j = k - 1; j >= 0; j--) {
    const bit = 1 << (k - 1 - j);
    const nextGate = gate.slice();
    for (let i = 0; i < p; i++) nextGate[i ^ bit] = send(i, i ^ bit, hi[i] - lo[i], gate[i]);
    for (let i = 0; i < p; i++) {
      lo[i] = history[j].lo[i];
      hi[i] = history[j].hi[i];
    }
    gate.splice(0, p, ...nextGate);
  }
  for (let e = p; e < n; e++) send(e - p, e, elements, gate[e - p]);
  return s;
}

/** The divisor of n nearest sqrt(n) (1 or n only when n is prime). */
export function defaultGroupSize(n: number): number {
  let best = 1;
  for (let g = 1; g <= n; g++) if (n % g === 0 && Math.abs(Math.log(g) - Math.log(n) / 2) < Math.abs(Math.log(best) - Math.log(n) / 2)) best = g;
  return best;
}

function twoLevelSchedule(n: number, elements: number, per: number, g: number): Schedule {
  if (!Number.isInteger(g) || g < 1 || n % g !== 0) throw new RangeError(`group size ${g} does not divide ${n}`);
  const s = new Schedule(n);
  const m = n / g;
  const segBounds = segmentBounds(elements, g);
  const segs = segBounds.map((b) => b.end - b.start);
  const groups = range(m).map((j) => range(g).map((l) => j * g + l));
  // Reduce-scatter in each group: member l ends owning segment (l + 1) mod g.
  const reduced = groups.map((members) => ringPhases(s, members, segs, per, 0, g - 1, new Array(g).fill(0)));
  // Direct all-reduce of segment (l + 1) mod g among the members at place l of every group.
  const gathered = groups.map(() => new Array<number>(g).fill(0));
  for (let l = 0; l < g; l++) {
    const peers = range(m).map((j) => groups[j][l]);
    const done = directPhases(s, peers, segs[(l + 1) % g], per, range(m).map((j) => reduced[j][l]));
    for (let j = 0; j < m; j++) gathered[j][l] = done[j];
  }
  // All-gather in each group, starting at phase g-1 from the fully reduced segment.
  for (let j = 0; j < m; j++) ringPhases(s, groups[j], segs, per, g - 1, 2 * (g - 1), gathered[j]);
  return s;
}

/** The chunk-level schedule of one all-reduce of `bytes` (float32) among n members. */
export function allReduceSchedule(algorithm: AllReduceAlgorithm, n: number, bytes: number, opts: ScheduleOptions = {}): Schedule {
  const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK_BYTES;
  if (!Number.isInteger(chunkBytes) || chunkBytes < 4 || chunkBytes % 4 !== 0) throw new RangeError(`chunkBytes must be a positive multiple of 4, got ${chunkBytes}`);
  if (!(bytes >= 0) || !Number.isFinite(bytes)) throw new RangeError(`bytes must be finite and >= 0, got ${bytes}`);
  const elements = Math.ceil(bytes / 4);
  const per = chunkBytes / 4;
  if (n === 1) return new Schedule(1);
  const build = BUILDERS[algorithm];
  if (!build) throw new RangeError(`unknown all-reduce algorithm ${String(algorithm)}`);
  return build(n, elements, per, opts);
}

const BUILDERS: Record<AllReduceAlgorithm, (n: number, elements: number, per: number, opts: ScheduleOptions) => Schedule> = {
  ring: (n, elements, per) => ringSchedule(n, elements, per),
  direct: (n, elements, per) => directSchedule(n, elements, per),
  halving_doubling: (n, elements, per) => halvingDoublingSchedule(n, elements, per),
  two_level: (n, elements, per, opts) => twoLevelSchedule(n, elements, per, opts.groupSize ?? defaultGroupSize(n)),
};

function directSchedule(n: number, elements: number, per: number): Schedule {
  const s = new Schedule(n);
  directPhases(s, range(n), elements, per, new Array(n).fill(0));
  return s;
}
