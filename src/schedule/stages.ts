/**
 * The pipeline's stage planner: which contiguous layers each of S stages holds, and which
 * workers hold each stage. Pure: a per-layer profile (measured on one machine,
 * src/runtime/layerProfile.ts) and the workers' limits in, a plan with its reasons out.
 *
 * How it plans:
 *  1. D = workers / S. The workers are sorted by memory limit (largest first, no limit
 *     before any), then speed, then rank, and cut into S groups of D: group k is the k-th
 *     slice, so the replicas of one stage are alike (a stage runs at its slowest replica's
 *     pace and must fit its smallest one).
 *  2. The groups are placed along the pipeline in every distinct order when S <= 6 (the
 *     order matters: under 1f1b the first stages keep more micro-batches in flight), else in
 *     the sorted order.
 *  3. For each order the layers are split into S contiguous non-empty segments. Each stage's
 *     memory and compute only grow as its segment grows, so "is there a split in which
 *     every stage stays within thresholds (F, K)?" is a dynamic programme over the layer
 *     boundaries each stage can end at (one sweep per stage), and the smallest feasible
 *     thresholds are found by bisection:
 *       - first the largest memory fraction F* (a stage's estimated peak / its cap; stages
 *         without a cap count 0); F* > 1 means nothing fits and the error names the stage;
 *       - then the slowest stage's compute time K*, with every stage within F* (objective
 *         "memory": every worker has a limit, so a provider with twice the memory holds about
 *         twice the layers, and compute breaks ties) or within its cap (objective "compute").
 *     Among the splits that meet (F*, K*) the boundaries are chosen from the last stage back,
 *     each stage taking the share closest to an even spread of the rest.
 *  4. The best order wins (lexicographically by the objective, then the other figure).
 */
import { ConfigError } from "../errors.js";

/** One layer of the profile (python-runtime/nimble_worker/pipeline/profile.py), per micro-batch. */
export interface LayerCost {
  name: string;
  type?: string;
  params: number;
  param_bytes: number;
  /** The layer's output for one micro-batch: what crosses to the next stage. */
  activation_bytes: number;
  /** What its backward keeps from the forward, per micro-batch in flight. */
  saved_bytes: number;
  /** Forward and backward of one micro-batch on the profiling machine. */
  forward_backward_s: number;
}

export interface StageWorker {
  rank: number;
  /** The provider's per-worker limit (--max-memory) or a GPU's memory; null: no limit. */
  memoryBytes: number | null;
  /** Relative speed (1 when unknown); only ratios between workers matter. */
  samplesPerS: number;
}

export type PipelineScheduleName = "gpipe" | "1f1b";

export interface StagePlanInput {
  layers: LayerCost[];
  workers: StageWorker[];
  stages: number;
  microBatches: number;
  schedule: PipelineScheduleName;
  /** Bytes of optimizer state per parameter byte (optimizerStateFactor). */
  optimizerStateFactor: number;
  /** What a worker costs before any layer (the profile's base_rss_bytes). */
  baseBytes: number;
}

export interface PlannedStage {
  index: number;
  /** [lo, hi): the layers it holds. */
  layers: [number, number];
  /** Its first and last layers' names. */
  names: [string, string];
  /** The D workers holding it (ascending). */
  ranks: number[];
  params: number;
  /** Estimated peak: base + params * (2 + optimizer state) + saved * in flight + 2 * largest activation. */
  memoryBytes: number;
  /** The smallest limit among its holders; null when none has one. */
  capBytes: number | null;
  /** Forward + backward of one micro-batch at its slowest holder's relative speed (seconds of the profiling machine). */
  computeS: number;
}

export interface PipelinePlan {
  stages: PlannedStage[];
  /** chains[d][s]: the rank holding stage s in chain (replica) d. */
  chains: number[][];
  /** S + 1 layer indices: stage s holds [bounds[s], bounds[s + 1]). */
  bounds: number[];
  /** One line per decision: what bound it. */
  why: string[];
  objective: "memory" | "compute";
}

/** A pipeline that cannot be planned for these workers (a config problem: exit 2). */
export class PlanError extends ConfigError {
  constructor(message: string, hint?: string) {
    super(message, hint);
    this.name = "PlanError";
  }
}

/** Bytes of optimizer state per parameter byte: sgd 0, sgd with momentum 1, adam/adamw 2. */
export function optimizerStateFactor(optimizer: { name: string; momentum?: number }): number {
  if (optimizer.name === "sgd") return (optimizer.momentum ?? 0) > 0 ? 1 : 0;
  return 2;
}

/** Orders of the stage groups are all tried up to this many stages. */
const MAX_PERMUTED_STAGES = 6;
/** ... and while orders x stages x layers stays within this (most orders take a sweep or two, some a few dozen). */
const PERMUTATION_BUDGET = 2_000_000;
/** The boundary table of one order: stages x layers cells. */
const MAX_CELLS = 50_000_000;
/** Relative slack for "the same" figure (bisection ends within 1e-12 of the optimum). */
const TIE = 1e-9;

interface Group {
  ranks: number[];
  cap: number | null;
  /** The slowest holder's speed relative to the fastest worker. */
  speed: number;
}

interface Solved {
  order: Group[];
  bounds: number[];
  maxFrac: number;
  maxComp: number;
  /** Where the largest fraction / compute time is. */
  fracStage: number;
  compStage: number;
}

/** Plan the stages (see the module comment). Throws PlanError when they cannot be planned. */
export function planStages(input: StagePlanInput): PipelinePlan {
  const { layers, workers, stages: S, microBatches: M, schedule } = input;
  validate(input);
  const L = layers.length;
  const W = workers.length;
  if (S > L) {
    throw new PlanError(
      `parallel.pipeline_stages: ${S} stages need at least ${S} layers, and the model has ${L} (each stage holds at least one)`,
      `Use at most ${L} pipeline stages, or split the model into more top-level layers.`,
    );
  }
  if (W % S !== 0) {
    throw new PlanError(`parallel.pipeline_stages: ${S} does not divide the ${W} workers: every stage needs the same number of replicas`);
  }
  const D = W / S;
  if ((S + 1) * (L + 1) > MAX_CELLS) throw new PlanError(`parallel.pipeline_stages: ${S} stages over ${L} layers is more than the planner takes (${MAX_CELLS} stage-layer pairs)`);

  // 1. Groups of alike workers.
  const fastest = Math.max(...workers.map((w) => w.samplesPerS));
  const sorted = [...workers].sort(
    (a, b) => (b.memoryBytes ?? Infinity) - (a.memoryBytes ?? Infinity) || b.samplesPerS - a.samplesPerS || a.rank - b.rank,
  );
  const groups: Group[] = [];
  for (let k = 0; k < S; k++) {
    const members = sorted.slice(k * D, (k + 1) * D);
    const caps = members.map((w) => w.memoryBytes).filter((c): c is number => c !== null);
    groups.push({
      ranks: members.map((w) => w.rank).sort((a, b) => a - b),
      cap: caps.length > 0 ? Math.min(...caps) : null,
      speed: Math.min(...members.map((w) => w.samplesPerS)) / fastest,
    });
  }
  const objective: PipelinePlan["objective"] = workers.every((w) => w.memoryBytes !== null) ? "memory" : "compute";
  const model = new CostModel(input);

  // 2. The orders to try.
  const why: string[] = [];
  why.push(
    D === 1
      ? `${W} worker${W === 1 ? "" : "s"} in ${S} stage${S === 1 ? "" : "s"}, one worker each`
      : `${W} workers in ${S} stages of ${D} replicas: grouped by memory limit, then speed, so a stage's replicas are alike`,
  );
  const unlimited = workers.filter((w) => w.memoryBytes === null).map((w) => w.rank);
  why.push(
    objective === "memory"
      ? "every worker has a memory limit: the split evens out each stage's share of its limit, then the slowest stage's compute"
      : unlimited.length === W
        ? "no worker has a memory limit: the split evens out the stages' compute time"
        : `rank${unlimited.length === 1 ? "" : "s"} ${unlimited.join(", ")} ${unlimited.length === 1 ? "has" : "have"} no memory limit: the split evens out the stages' compute time, each stage within its limit`,
  );
  let orders: Group[][];
  const distinct = S <= MAX_PERMUTED_STAGES ? distinctOrders(groups) : [groups];
  if (S > MAX_PERMUTED_STAGES) {
    orders = [groups];
    why.push(`more than ${MAX_PERMUTED_STAGES} stages: the groups keep their sorted order along the pipeline (largest memory first)`);
  } else if (distinct.length * S * L > PERMUTATION_BUDGET) {
    orders = [groups];
    why.push(`${distinct.length} orders of the groups over ${L} layers are too many to try: the groups keep their sorted order (largest memory first)`);
  } else {
    orders = distinct;
  }

  // 3. The best split of each order; 4. the best order.
  let best: Solved | null = null;
  let leastInfeasible: Solved | null = null;
  for (const order of orders) {
    const solved = model.solve(order, objective, best);
    if (!solved) continue;
    if (solved.maxFrac > 1) {
      if (!leastInfeasible || solved.maxFrac < leastInfeasible.maxFrac) leastInfeasible = solved;
      continue;
    }
    if (!best || better(solved, best, objective)) best = solved;
  }
  if (!best) throw model.cannotFit(leastInfeasible!);
  if (orders.length > 1) {
    why.push(`tried ${orders.length} orders of the stage groups along the pipeline; the best starts with rank${best.order[0]!.ranks.length === 1 ? "" : "s"} ${best.order[0]!.ranks.join(", ")}`);
  }

  const plan: PlannedStage[] = best.order.map((g, s) => model.stage(s, best!.bounds[s]!, best!.bounds[s + 1]!, g));
  for (const st of plan) {
    const [lo, hi] = st.layers;
    const mem = st.capBytes === null ? `${formatBytes(st.memoryBytes)}, no limit` : `${formatBytes(st.memoryBytes)} of ${formatBytes(st.capBytes)} limit, ${percent(st.memoryBytes / st.capBytes)}`;
    why.push(`stage ${st.index} holds layers ${span(lo, hi)} (${mem}; ${formatMs(st.computeS)} per micro-batch${best.order[st.index]!.speed < 1 ? ` at ${best.order[st.index]!.speed.toFixed(2)}x the fastest speed` : ""})`);
  }
  if (S > 1) {
    const f = plan[best.fracStage]!;
    const c = plan[best.compStage]!;
    const memoryBound = `stage ${f.index}'s memory (${percent(best.maxFrac)} of its limit)`;
    const computeBound = `stage ${c.index}'s compute (${formatMs(c.computeS)} per micro-batch: the pipeline moves at its slowest stage's pace)`;
    if (objective === "memory") why.push(`bound by ${memoryBound}: moving a boundary would put another stage's share higher; then by ${computeBound}`);
    else why.push(`bound by ${computeBound}${best.maxFrac > 1 - 0.05 && f.capBytes !== null ? `, and ${memoryBound} keeps layers from moving` : ""}`);
  }
  why.push(
    schedule === "gpipe"
      ? `gpipe keeps all ${M} micro-batches' saved activations in every stage`
      : `1f1b keeps at most min(stages - index, ${M}) micro-batches' saved activations in a stage (stage 0: ${Math.min(S, M)})`,
  );

  const chains = Array.from({ length: D }, (_, d) => best!.order.map((g) => g.ranks[d]!));
  return { stages: plan, chains, bounds: best.bounds, why, objective };
}

function better(a: Solved, b: Solved, objective: PipelinePlan["objective"]): boolean {
  const [a1, a2, b1, b2] = objective === "memory" ? [a.maxFrac, a.maxComp, b.maxFrac, b.maxComp] : [a.maxComp, a.maxFrac, b.maxComp, b.maxFrac];
  if (a1 < b1 * (1 - TIE)) return true;
  if (a1 > b1 * (1 + TIE)) return false;
  return a2 < b2 * (1 - TIE);
}

/** The groups' orders that differ in what matters (cap and speed), the sorted one first. */
function distinctOrders(groups: Group[]): Group[][] {
  const out: Group[][] = [];
  const seen = new Set<string>();
  const sig = (order: Group[]) => order.map((g) => `${g.cap}:${g.speed}`).join("|");
  const permute = (rest: Group[], acc: Group[]) => {
    if (rest.length === 0) {
      const key = sig(acc);
      if (!seen.has(key)) {
        seen.add(key);
        out.push([...acc]);
      }
      return;
    }
    for (let i = 0; i < rest.length; i++) permute([...rest.slice(0, i), ...rest.slice(i + 1)], [...acc, rest[i]!]);
  };
  permute(groups, []);
  return out;
}

function validate(input: StagePlanInput): void {
  const bad = (what: string) => {
    throw new Error(`planStages: ${what}`);
  };
  const { layers, workers, stages, microBatches, optimizerStateFactor: f, baseBytes } = input;
  if (!Number.isInteger(stages) || stages < 1) bad(`stages must be an integer >= 1, found ${stages}`);
  if (!Number.isInteger(microBatches) || microBatches < 1) bad(`microBatches must be an integer >= 1, found ${microBatches}`);
  if (!(Number.isFinite(f) && f >= 0)) bad(`optimizerStateFactor must be a number >= 0, found ${f}`);
  if (!(Number.isFinite(baseBytes) && baseBytes >= 0)) bad(`baseBytes must be a number >= 0, found ${baseBytes}`);
  if (workers.length === 0) bad("no workers");
  for (const w of workers) {
    if (!(Number.isFinite(w.samplesPerS) && w.samplesPerS > 0)) bad(`rank ${w.rank}: samplesPerS must be > 0, found ${w.samplesPerS}`);
    if (w.memoryBytes !== null && !(Number.isFinite(w.memoryBytes) && w.memoryBytes > 0)) bad(`rank ${w.rank}: memoryBytes must be > 0 or null, found ${w.memoryBytes}`);
  }
  if (new Set(workers.map((w) => w.rank)).size !== workers.length) bad("ranks must be distinct");
  for (const [i, l] of layers.entries()) {
    for (const k of ["params", "param_bytes", "activation_bytes", "saved_bytes", "forward_backward_s"] as const) {
      if (!(Number.isFinite(l[k]) && l[k] >= 0)) bad(`layer ${i} (${l.name}): ${k} must be a number >= 0, found ${l[k]}`);
    }
  }
}

/** Prefix sums and a range-max table over the profile: any segment's figures in O(1). */
class CostModel {
  readonly L: number;
  readonly S: number;
  #paramBytes: Float64Array;
  #saved: Float64Array;
  #fb: Float64Array;
  #params: Float64Array;
  /** #maxAct[k][i]: the largest activation in layers [i, i + 2^k). */
  #maxAct: Float64Array[];

  constructor(readonly input: StagePlanInput) {
    const { layers } = input;
    this.L = layers.length;
    this.S = input.stages;
    const prefix = (get: (l: LayerCost) => number) => {
      const out = new Float64Array(this.L + 1);
      for (let i = 0; i < this.L; i++) out[i + 1] = out[i]! + get(layers[i]!);
      return out;
    };
    this.#paramBytes = prefix((l) => l.param_bytes);
    this.#saved = prefix((l) => l.saved_bytes);
    this.#fb = prefix((l) => l.forward_backward_s);
    this.#params = prefix((l) => l.params);
    this.#maxAct = [Float64Array.from(layers, (l) => l.activation_bytes)];
    for (let k = 1; 1 << k <= this.L; k++) {
      const prev = this.#maxAct[k - 1]!;
      const half = 1 << (k - 1);
      const row = new Float64Array(this.L - (1 << k) + 1);
      for (let i = 0; i < row.length; i++) row[i] = Math.max(prev[i]!, prev[i + half]!);
      this.#maxAct.push(row);
    }
  }

  inFlight(s: number): number {
    const { microBatches: M, schedule } = this.input;
    return schedule === "gpipe" ? M : Math.min(this.S - s, M);
  }

  /** Estimated peak bytes of stage `s` holding layers [lo, hi) (lo < hi). */
  memory(s: number, lo: number, hi: number): number {
    const k = 31 - Math.clz32(hi - lo);
    const row = this.#maxAct[k]!;
    const maxAct = Math.max(row[lo]!, row[hi - (1 << k)]!);
    const { baseBytes, optimizerStateFactor: f } = this.input;
    return baseBytes + (this.#paramBytes[hi]! - this.#paramBytes[lo]!) * (2 + f) + (this.#saved[hi]! - this.#saved[lo]!) * this.inFlight(s) + 2 * maxAct;
  }

  frac(s: number, g: Group, lo: number, hi: number): number {
    return g.cap === null ? 0 : this.memory(s, lo, hi) / g.cap;
  }

  compute(g: Group, lo: number, hi: number): number {
    return (this.#fb[hi]! - this.#fb[lo]!) / g.speed;
  }

  stage(s: number, lo: number, hi: number, g: Group): PlannedStage {
    const { layers } = this.input;
    return {
      index: s,
      layers: [lo, hi],
      names: [layers[lo]!.name, layers[hi - 1]!.name],
      ranks: g.ranks,
      params: this.#params[hi]! - this.#params[lo]!,
      memoryBytes: this.memory(s, lo, hi),
      capBytes: g.cap,
      computeS: this.compute(g, lo, hi),
    };
  }

  /**
   * The boundaries each stage can end at with every stage within (fracLimit, compLimit):
   * reach[s][i] = 1 when layers [0, i) split into s stages that stay within them. Each stage
   * is one sweep: a segment within the limits stays within them as it shrinks, so the
   * furthest end from each start only moves forward. null when [0, L) cannot be split.
   */
  reach(order: Group[], fracLimit: number, compLimit: number, keep: boolean): Uint8Array[] | null {
    const { L, S } = this;
    let cur = new Uint8Array(L + 1);
    cur[0] = 1;
    const all: Uint8Array[] = keep ? [cur] : [];
    const diff = new Int32Array(L + 2);
    for (let s = 0; s < S; s++) {
      const g = order[s]!;
      diff.fill(0);
      let end = 0;
      let any = false;
      for (let lo = 0; lo < L; lo++) {
        if (end < lo) end = lo;
        while (end < L && this.frac(s, g, lo, end + 1) <= fracLimit && this.compute(g, lo, end + 1) <= compLimit) end++;
        if (cur[lo] && end > lo) {
          diff[lo + 1]!++;
          diff[end + 1]!--;
          any = true;
        }
      }
      if (!any) return null;
      const next = new Uint8Array(L + 1);
      let run = 0;
      for (let i = 0; i <= L; i++) {
        run += diff[i]!;
        next[i] = run > 0 ? 1 : 0;
      }
      cur = next;
      if (keep) all.push(cur);
    }
    return cur[L] ? (keep ? all : [cur]) : null;
  }

  /** The smallest threshold in [0, hi] for which `feasible` holds (it holds at hi). */
  static bisect(hi: number, feasible: (t: number) => boolean): number {
    if (hi <= 0) return hi;
    let lo = 0;
    for (let i = 0; i < 200 && hi - lo > hi * 1e-12; i++) {
      const mid = (lo + hi) / 2;
      if (feasible(mid)) hi = mid;
      else lo = mid;
    }
    return hi;
  }

  /**
   * The best split for one order of the groups; null when it cannot beat `bound` (the best
   * feasible split of the orders tried so far), which one sweep usually shows.
   */
  solve(order: Group[], objective: PipelinePlan["objective"], bound: Solved | null): Solved | null {
    const { L, S } = this;
    const feasible = (fracLimit: number, compLimit: number) => this.reach(order, fracLimit, compLimit, false) !== null;
    // Every stage holding every layer bounds any split's figures from above.
    const fracHi = Math.max(...order.map((g, s) => this.frac(s, g, 0, L)));
    const compHi = Math.max(...order.map((g) => this.compute(g, 0, L)));
    let fracLimit: number;
    let compUpper = compHi;
    if (objective === "memory") {
      // The largest memory fraction F* first; a bound must be met within TIE.
      const fracUpper = bound ? bound.maxFrac * (1 + TIE) : fracHi;
      if (bound && !feasible(fracUpper, Infinity)) return null;
      const fStar = CostModel.bisect(fracUpper, (t) => feasible(t, Infinity));
      // Within F*; past the caps (nothing fits), within F* for the error.
      fracLimit = fStar > 1 ? fStar * (1 + TIE) : Math.min(fStar * (1 + TIE), 1);
    } else if (feasible(1, Infinity)) {
      fracLimit = 1; // every stage within its cap
      if (bound) {
        compUpper = bound.maxComp * (1 + TIE);
        if (!feasible(1, compUpper)) return null;
      }
    } else {
      if (bound) return null;
      // Nothing fits in this order: the split closest to fitting, for the error.
      fracLimit = CostModel.bisect(fracHi, (t) => feasible(t, Infinity)) * (1 + TIE);
    }
    const kStar = CostModel.bisect(compUpper, (t) => feasible(fracLimit, t));
    const compLimit = kStar * (1 + TIE);
    const reach = this.reach(order, fracLimit, compLimit, true)!;

    // Back from the last stage: among the starts that keep the rest splittable, the one
    // closest to an even spread of [0, hi) over the stages left.
    const bounds = new Array<number>(S + 1).fill(0);
    bounds[S] = L;
    let hi = L;
    for (let s = S - 1; s >= 1; s--) {
      const g = order[s]!;
      const target = this.evenShare(order, s, hi, objective);
      let pick = -1;
      let pickDist = Infinity;
      for (let lo = hi - 1; lo >= s; lo--) {
        if (!(this.frac(s, g, lo, hi) <= fracLimit && this.compute(g, lo, hi) <= compLimit)) break;
        if (!reach[s]![lo]) continue;
        const dist = Math.abs(this.load(s, g, lo, hi, objective) - target);
        if (dist < pickDist) {
          pick = lo;
          pickDist = dist;
        }
      }
      bounds[s] = pick;
      hi = pick;
    }
    let maxFrac = -1;
    let maxComp = -1;
    let fracStage = 0;
    let compStage = 0;
    for (let s = 0; s < S; s++) {
      const fr = this.frac(s, order[s]!, bounds[s]!, bounds[s + 1]!);
      const co = this.compute(order[s]!, bounds[s]!, bounds[s + 1]!);
      if (fr > maxFrac) [maxFrac, fracStage] = [fr, s];
      if (co > maxComp) [maxComp, compStage] = [co, s];
    }
    return { order, bounds, maxFrac, maxComp, fracStage, compStage };
  }

  /** What the backward pass evens out: memory fraction (objective memory) or compute time. */
  load(s: number, g: Group, lo: number, hi: number, objective: PipelinePlan["objective"]): number {
    return objective === "memory" ? this.frac(s, g, lo, hi) : this.compute(g, lo, hi);
  }

  /** Stage s's figure if [0, hi) were spread evenly over stages 0..s (by caps or speeds). */
  evenShare(order: Group[], s: number, hi: number, objective: PipelinePlan["objective"]): number {
    const head = order.slice(0, s + 1);
    if (objective === "compute") return this.#fb[hi]! / head.reduce((a, g) => a + g.speed, 0);
    // Equal fractions phi: sum of (phi * cap - base) over the stages = the layers' own bytes.
    const { baseBytes, optimizerStateFactor: f } = this.input;
    const own = this.#paramBytes[hi]! * (2 + f) + this.#saved[hi]! * this.inFlight(s);
    return (own + (s + 1) * baseBytes) / head.reduce((a, g) => a + (g.cap ?? 0), 0);
  }

  /** The error for the order that came closest: the stage that cannot fit, its layers and the numbers. */
  cannotFit(solved: Solved): PlanError {
    const s = solved.fracStage;
    const g = solved.order[s]!;
    const lo = solved.bounds[s]!;
    const hi = solved.bounds[s + 1]!;
    const need = this.memory(s, lo, hi);
    const base = this.input.baseBytes;
    const baseNote = g.cap !== null && base >= g.cap ? `; a worker's base before any layer is ${formatBytes(base)} alone` : "";
    const which = hi - lo === 1 ? `layer ${lo}, ${this.input.layers[lo]!.name}, which cannot be split` : `layers ${span(lo, hi)}`;
    return new PlanError(
      `parallel.pipeline_stages: the model does not fit: in the best split over ${this.S} stage${this.S === 1 ? "" : "s"}, stage ${s} needs at least ${formatBytes(need)} ` +
        `(${which}), its providers allow ${formatBytes(g.cap ?? 0)} (rank${g.ranks.length === 1 ? "" : "s"} ${g.ranks.join(", ")})${baseNote}`,
      "Use more pipeline stages (fewer layers each), fewer micro-batches in flight (schedule 1f1b or smaller parallel.micro_batches), an optimizer with less state, or providers with more memory.",
    );
  }
}

/** Layers [lo, hi) as people count them: "4-7", or "4" for one. */
function span(lo: number, hi: number): string {
  return hi - lo === 1 ? `${lo}` : `${lo}-${hi - 1}`;
}

/** Decimal units, as the rest of the CLI prints them (src/ui/format.ts, a layer below this one). */
function formatBytes(bytes: number): string {
  if (bytes < 1000) return `${Math.round(bytes)} B`;
  const units = ["kB", "MB", "GB", "TB", "PB"];
  let v = bytes;
  let i = -1;
  while ((v >= 1000 || (v >= 999.95 && i < 0)) && i < units.length - 1) {
    v /= 1000;
    i++;
  }
  if (v >= 999.95 && i < units.length - 1) {
    v /= 1000;
    i++;
  }
  return `${v < 100 ? v.toFixed(1) : v.toFixed(0)} ${units[i]}`;
}

function formatCount(n: number): string {
  if (n < 1000) return String(Math.round(n));
  if (n < 1e6) return `${(n / 1e3).toFixed(1)}k`;
  if (n < 1e9) return `${(n / 1e6).toFixed(1)}M`;
  return `${(n / 1e9).toFixed(2)}B`;
}

function formatMs(seconds: number): string {
  const ms = seconds * 1000;
  return `${ms < 10 ? ms.toFixed(2) : ms < 100 ? ms.toFixed(1) : ms.toFixed(0)} ms`;
}

function percent(x: number): string {
  return `${(x * 100).toFixed(0)}%`;
}

/** The plan for the console: one line per stage (layers, params, memory vs cap, ranks), then the chains. */
export function describePlan(plan: PipelinePlan): string[] {
  const rows = plan.stages.map((st) => {
    const [lo, hi] = st.layers;
    const names = st.names[0] === st.names[1] ? st.names[0] : `${st.names[0]} .. ${st.names[1]}`;
    const mem = st.capBytes === null ? `${formatBytes(st.memoryBytes)} (no limit)` : `${formatBytes(st.memoryBytes)} of ${formatBytes(st.capBytes)} (${percent(st.memoryBytes / st.capBytes)})`;
    return [`stage ${st.index}`, `layers ${span(lo, hi)}`, names, `${formatCount(st.params)} params`, mem, `${formatMs(st.computeS)}/micro-batch`, `rank${st.ranks.length === 1 ? "" : "s"} ${st.ranks.join(", ")}`];
  });
  const widths = rows[0]?.map((_, c) => Math.max(...rows.map((r) => r[c]!.length))) ?? [];
  const lines = rows.map((r) => r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!))).join("  "));
  if (plan.chains.length > 1) lines.push(`${plan.chains.length} chains: ${plan.chains.map((c) => c.join(" -> ")).join(";  ")}`);
  return lines;
}
