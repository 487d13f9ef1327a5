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
import { CostModel, formatBytes, formatCount, formatMs, percent, PlanError, span, TIE, type Group, type Solved } from "./stageCosts.js";

export { PlanError } from "./stageCosts.js";

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
  /** eval.batch_size over the profile's micro-batch: evaluation's activations against training's (0: no evaluation). */
  evalBatchRatio?: number;
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
