/**
 * The stage planner's cost model (src/schedule/stages.ts): each segment of layers' memory
 * and compute in O(1) from prefix sums and a range-max table, the feasibility sweeps, and
 * the planner's error; and the number formats its lines use.
 */
import { ConfigError } from "../errors.js";
import type { LayerCost, PipelinePlan, PlannedStage, StagePlanInput } from "./stages.js";

/** A pipeline that cannot be planned for these workers (a config problem: exit 2). */
export class PlanError extends ConfigError {
  constructor(message: string, hint?: string) {
    super(message, hint);
    this.name = "PlanError";
  }
}


/** Relative slack for "the same" figure (bisection ends within 1e-12 of the optimum). */
export const TIE = 1e-9;

export interface Group {
  ranks: number[];
  cap: number | null;
  /** The slowest holder's speed relative to the fastest worker. */
  speed: number;
}

export interface Solved {
  order: Group[];
  bounds: number[];
  maxFrac: number;
  maxComp: number;
  /** Where the largest fraction / compute time is. */
  fracStage: number;
  compStage: number;
}

/** Prefix sums and a range-max table over the profile: any segment's figures in O(1). */
export class CostModel {
  readonly L: number;
  readonly S: number;
  #paramBytes: Float64Array;
  #saved: Float64Array;
  #fb: Float64Array;
  #params: Float64Array;
  /** #maxAct[k][i]: the largest activation in layers [i, i + 2^k). */
  #maxAct: Float64Array[];
  /** The same for a layer's forward alone (what it saves plus its input and output): evaluation's peak. */
  #maxForward: Float64Array[];

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
    const rangeMax = (get: (l: LayerCost) => number) => {
      const table = [Float64Array.from(layers, get)];
      for (let k = 1; 1 << k <= this.L; k++) {
        const prev = table[k - 1]!;
        const half = 1 << (k - 1);
        const row = new Float64Array(this.L - (1 << k) + 1);
        for (let i = 0; i < row.length; i++) row[i] = Math.max(prev[i]!, prev[i + half]!);
        table.push(row);
      }
      return table;
    };
    this.#maxAct = rangeMax((l) => l.activation_bytes);
    this.#maxForward = rangeMax((l) => l.saved_bytes + 2 * l.activation_bytes);
  }

  static #max(table: Float64Array[], lo: number, hi: number): number {
    const k = 31 - Math.clz32(hi - lo);
    const row = table[k]!;
    return Math.max(row[lo]!, row[hi - (1 << k)]!);
  }

  inFlight(s: number): number {
    const { microBatches: M, schedule } = this.input;
    return schedule === "gpipe" ? M : Math.min(this.S - s, M);
  }

  /** Estimated peak bytes of stage `s` holding layers [lo, hi) (lo < hi). */
  memory(s: number, lo: number, hi: number): number {
    const maxAct = CostModel.#max(this.#maxAct, lo, hi);
    const { baseBytes, optimizerStateFactor: f, evalBatchRatio = 0 } = this.input;
    const params = this.#paramBytes[hi]! - this.#paramBytes[lo]!;
    const training = baseBytes + params * (2 + f) + (this.#saved[hi]! - this.#saved[lo]!) * this.inFlight(s) + 2 * maxAct;
    // Evaluation: no gradients, one batch of eval.batch_size through one layer at a time.
    const evaluation = baseBytes + params * (1 + f) + CostModel.#max(this.#maxForward, lo, hi) * evalBatchRatio;
    return Math.max(training, evaluation);
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
export function span(lo: number, hi: number): string {
  return hi - lo === 1 ? `${lo}` : `${lo}-${hi - 1}`;
}

/** Decimal units, as the rest of the CLI prints them (src/ui/format.ts, a layer below this one). */
export function formatBytes(bytes: number): string {
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

export function formatCount(n: number): string {
  if (n < 1000) return String(Math.round(n));
  if (n < 1e6) return `${(n / 1e3).toFixed(1)}k`;
  if (n < 1e9) return `${(n / 1e6).toFixed(1)}M`;
  return `${(n / 1e9).toFixed(2)}B`;
}

export function formatMs(seconds: number): string {
  const ms = seconds * 1000;
  return `${ms < 10 ? ms.toFixed(2) : ms < 100 ? ms.toFixed(1) : ms.toFixed(0)} ms`;
}

export function percent(x: number): string {
  return `${(x * 100).toFixed(0)}%`;
}

