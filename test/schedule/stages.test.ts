import { describe, expect, it } from "vitest";
import { ConfigError } from "../../src/errors.js";
import { describePlan, optimizerStateFactor, PlanError, planStages, type LayerCost, type StagePlanInput, type StageWorker } from "../../src/schedule/stages.js";
import { seededRandom } from "../helpers/random.js";

const MB = 1e6;

function layer(i: number, over: Partial<LayerCost> = {}): LayerCost {
  return { name: `layer${i}`, params: 1000, param_bytes: 4 * MB, activation_bytes: 0, saved_bytes: 0, forward_backward_s: 0.01, ...over };
}
const equalLayers = (n: number, over: Partial<LayerCost> = {}) => Array.from({ length: n }, (_, i) => layer(i, over));
const worker = (rank: number, memoryBytes: number | null = null, samplesPerS = 1): StageWorker => ({ rank, memoryBytes, samplesPerS });

function input(over: Partial<StagePlanInput>): StagePlanInput {
  return { layers: equalLayers(12), workers: [worker(0), worker(1)], stages: 2, microBatches: 4, schedule: "1f1b", optimizerStateFactor: 0, baseBytes: 0, ...over };
}
const sizes = (bounds: number[]) => bounds.slice(1).map((b, i) => b - bounds[i]!);

function errorOf(f: () => unknown): PlanError {
  try {
    f();
  } catch (err) {
    expect(err).toBeInstanceOf(PlanError);
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as PlanError).exitCode).toBe(2);
    return err as PlanError;
  }
  throw new Error("expected a PlanError");
}

describe("planStages", () => {
  it("allows for evaluation's larger batch: a stage needs the more of training and evaluating", () => {
    const layers = equalLayers(4, { saved_bytes: 1 * MB, activation_bytes: 0.5 * MB });
    const training = planStages(input({ layers, stages: 1, workers: [worker(0)] })).stages[0]!.memoryBytes;
    // Training: 16 MB of parameters x 2 + 4 MB saved x 1 in flight + 2 x 0.5 MB.
    expect(training).toBe(16 * MB * 2 + 4 * MB + 1 * MB);
    // Evaluating 64 micro-batches' worth at once: parameters once + one layer's forward (1 + 2 x 0.5 MB) x 64.
    const evaluating = planStages(input({ layers, stages: 1, workers: [worker(0)], evalBatchRatio: 64 })).stages[0]!.memoryBytes;
    expect(evaluating).toBe(16 * MB + 2 * MB * 64);
    expect(planStages(input({ layers, stages: 1, workers: [worker(0)], evalBatchRatio: 2 })).stages[0]!.memoryBytes).toBe(training);
  });

  it("balances equal workers by compute, with the plan's figures", () => {
    const plan = planStages(input({ workers: [worker(0), worker(1), worker(2)], stages: 3 }));
    expect(plan.objective).toBe("compute");
    expect(plan.bounds).toEqual([0, 4, 8, 12]);
    expect(plan.chains).toEqual([[0, 1, 2]]);
    expect(plan.stages.map((s) => s.layers)).toEqual([[0, 4], [4, 8], [8, 12]]);
    expect(plan.stages[1]).toMatchObject({ index: 1, names: ["layer4", "layer7"], ranks: [1], params: 4000, capBytes: null, memoryBytes: 4 * 4 * MB * 2 });
    expect(plan.stages[1]!.computeS).toBeCloseTo(0.04, 12);
    expect(plan.why.join("\n")).toContain("no worker has a memory limit: the split evens out the stages' compute time");
    expect(plan.why.some((l) => l.startsWith("stage 1 holds layers 4-7 (32.0 MB, no limit"))).toBe(true);
  });

  it("evens out unequal layers by their measured time", () => {
    const layers = [0.05, 0.01, 0.01, 0.01, 0.01, 0.01].map((t, i) => layer(i, { forward_backward_s: t }));
    const plan = planStages(input({ layers }));
    expect(plan.bounds).toEqual([0, 1, 6]);
  });

  it("gives a provider with twice the memory about twice the layers (2:1 pair, equal speed, 12 equal layers)", () => {
    const plan = planStages(input({ workers: [worker(0, 100 * MB), worker(1, 200 * MB)] }));
    expect(plan.objective).toBe("memory");
    // The larger one first (sorted by memory), holding 8 of the 12 layers.
    expect(plan.chains).toEqual([[1, 0]]);
    expect(sizes(plan.bounds)).toEqual([8, 4]);
    expect(plan.stages.map((s) => s.capBytes)).toEqual([200 * MB, 100 * MB]);
    expect(plan.stages.map((s) => s.memoryBytes)).toEqual([64 * MB, 32 * MB]);
    expect(plan.why.join("\n")).toContain("stage 0 holds layers 0-7 (64.0 MB of 200 MB limit, 32%");
    expect(plan.why.join("\n")).toContain("every worker has a memory limit");
  });

  it("counts base memory, optimizer state, saved activations in flight and the largest activation", () => {
    const layers = equalLayers(4, { param_bytes: 10 * MB, saved_bytes: 1 * MB, activation_bytes: 3 * MB });
    layers[1]!.activation_bytes = 5 * MB;
    const common = { layers, workers: [worker(0), worker(1)], baseBytes: 100 * MB, optimizerStateFactor: 2, microBatches: 4 };
    const onef = planStages(input({ ...common, schedule: "1f1b" }));
    // stage 0: 100 + 20 * (2 + 2) + 2 * min(2 - 0, 4) + 2 * 5; stage 1: 100 + 80 + 2 * 1 + 2 * 3.
    expect(onef.stages.map((s) => s.memoryBytes / MB)).toEqual([194, 188]);
    const gpipe = planStages(input({ ...common, schedule: "gpipe" }));
    expect(gpipe.stages.map((s) => s.memoryBytes / MB)).toEqual([198, 194]);
    expect(optimizerStateFactor({ name: "sgd", momentum: 0 })).toBe(0);
    expect(optimizerStateFactor({ name: "sgd", momentum: 0.9 })).toBe(1);
    expect(optimizerStateFactor({ name: "adamw" })).toBe(2);
  });

  it("gives a worker twice as fast about twice the compute when there are no limits", () => {
    const plan = planStages(input({ workers: [worker(0, null, 1), worker(1, null, 2)] }));
    expect(plan.objective).toBe("compute");
    const fast = plan.stages.find((s) => s.ranks[0] === 1)!;
    const slow = plan.stages.find((s) => s.ranks[0] === 0)!;
    expect(fast.layers[1] - fast.layers[0]).toBe(8);
    expect(slow.layers[1] - slow.layers[0]).toBe(4);
    // Relative to the fastest worker: both stages take 0.04 s of the profiling machine.
    expect(fast.computeS).toBeCloseTo(0.08, 12);
    expect(slow.computeS).toBeCloseTo(0.04 / 0.5, 12);
    expect(plan.why.join("\n")).toContain("0.50x the fastest speed");
  });

  it("keeps every stage within its cap when only some workers have one", () => {
    // Compute alone would split 6:6; rank 0 allows only 3 layers (3 * 8 MB of parameters and gradients).
    const plan = planStages(input({ workers: [worker(0, 25 * MB), worker(1, null)] }));
    expect(plan.objective).toBe("compute");
    const capped = plan.stages.find((s) => s.ranks[0] === 0)!;
    expect(capped.layers[1] - capped.layers[0]).toBe(3);
    expect(capped.memoryBytes).toBeLessThanOrEqual(25 * MB);
    expect(plan.why.join("\n")).toContain("rank 1 has no memory limit");
  });

  it("names the stage that cannot fit, its layers and the numbers", () => {
    // 12 layers of 8 MB each (params + gradients), 3 workers of 30 MB: 96 MB over 90 MB.
    const err = errorOf(() => planStages(input({ workers: [worker(0, 30 * MB), worker(1, 30 * MB), worker(2, 30 * MB)], stages: 3 })));
    expect(err.message).toMatch(/^parallel\.pipeline_stages: the model does not fit: in the best split over 3 stages, stage \d needs at least 32\.0 MB \(layers \d+-\d+\), its providers allow 30\.0 MB \(rank \d\)$/);
    expect(err.hint).toContain("more pipeline stages");
    // One layer that no stage can hold.
    const big = equalLayers(3);
    big[2]!.param_bytes = 100 * MB;
    const one = errorOf(() => planStages(input({ layers: big, workers: [worker(0, 50 * MB), worker(1, 50 * MB)] })));
    expect(one.message).toContain("stage 1 needs at least 200 MB (layer 2, layer2, which cannot be split), its providers allow 50.0 MB (rank 1)");
    // A worker's base alone past the limit is said.
    const base = errorOf(() => planStages(input({ layers: equalLayers(2), workers: [worker(0, 90 * MB), worker(1, 90 * MB)], baseBytes: 95 * MB })));
    expect(base.message).toMatch(/its providers allow 90\.0 MB \(rank \d\); a worker's base before any layer is 95\.0 MB alone$/);
  });

  it("refuses more stages than layers, and workers that do not divide into the stages", () => {
    expect(errorOf(() => planStages(input({ layers: equalLayers(3), workers: [0, 1, 2, 3].map((r) => worker(r)), stages: 4 }))).message).toBe(
      "parallel.pipeline_stages: 4 stages need at least 4 layers, and the model has 3 (each stage holds at least one)",
    );
    expect(errorOf(() => planStages(input({ workers: [0, 1, 2].map((r) => worker(r)), stages: 2 }))).message).toContain("2 does not divide the 3 workers");
  });

  it("groups D = 2 alike replicas per stage and lays out the chains", () => {
    const workers = [worker(0, 100 * MB), worker(1, 200 * MB), worker(2, 100 * MB), worker(3, 200 * MB)];
    const plan = planStages(input({ workers }));
    expect(plan.stages.map((s) => s.ranks)).toEqual([[1, 3], [0, 2]]);
    expect(plan.chains).toEqual([[1, 0], [3, 2]]);
    expect(sizes(plan.bounds)).toEqual([8, 4]);
    expect(plan.why[0]).toContain("4 workers in 2 stages of 2 replicas");
    // A group runs at its slowest holder's speed and fits its smallest one's memory.
    const mixed = planStages(input({ workers: [worker(0, 200 * MB, 1), worker(1, 200 * MB, 0.5), worker(2, 100 * MB, 1), worker(3, 100 * MB, 1)] }));
    expect(mixed.stages[0]!.ranks).toEqual([0, 1]);
    expect(mixed.stages[0]!.capBytes).toBe(200 * MB);
    const lines = describePlan(mixed);
    expect(lines).toHaveLength(3);
    expect(lines[0]).toMatch(/^stage 0 +layers 0-\d +layer0 \.\. layer\d +\d+\.\dk params +[\d.]+ MB of 200 MB \(\d+%\) +[\d.]+ ms\/micro-batch +ranks 0, 1$/);
    expect(lines[2]).toBe("2 chains: 0 -> 2;  1 -> 3");
  });

  it("finds the best split and order (brute force over small random cases)", () => {
    const rand = seededRandom(7);
    for (let trial = 0; trial < 300; trial++) {
      const L = 1 + Math.floor(rand() * 7);
      const S = 1 + Math.floor(rand() * Math.min(L, 3));
      const D = 1 + Math.floor(rand() * 2);
      const allCapped = rand() < 0.5;
      const layers = Array.from({ length: L }, (_, i) =>
        layer(i, { param_bytes: Math.round(rand() * 10 * MB), saved_bytes: Math.round(rand() * 2 * MB), activation_bytes: Math.round(rand() * 3 * MB), forward_backward_s: rand() * 0.1 }),
      );
      const workers = Array.from({ length: S * D }, (_, r) => worker(r, allCapped || rand() < 0.5 ? Math.round((20 + rand() * 150) * MB) : null, [1, 0.5, 2][Math.floor(rand() * 3)]!));
      const inp = input({ layers, workers, stages: S, schedule: rand() < 0.5 ? "gpipe" : "1f1b", microBatches: 1 + Math.floor(rand() * 4), optimizerStateFactor: Math.floor(rand() * 3), baseBytes: Math.round(rand() * 20 * MB) });
      const best = bruteForce(inp);
      const context = JSON.stringify({ trial, inp, best });
      let plan;
      try {
        plan = planStages(inp);
      } catch (err) {
        expect(best, context).toBeNull();
        expect(err, context).toBeInstanceOf(PlanError);
        continue;
      }
      expect(best, context).not.toBeNull();
      const fr = Math.max(...plan.stages.map((s) => (s.capBytes === null ? 0 : s.memoryBytes / s.capBytes)));
      const co = Math.max(...plan.stages.map((s) => s.computeS));
      expect(fr, context).toBeLessThanOrEqual(1);
      if (plan.objective === "memory") {
        expect(fr, context).toBeLessThanOrEqual(best!.first * (1 + 1e-6));
        if (fr <= best!.first * (1 + 1e-9)) expect(co, context).toBeLessThanOrEqual(best!.second * (1 + 1e-6));
      } else {
        expect(co, context).toBeLessThanOrEqual(best!.first * (1 + 1e-6));
      }
      expect(sizes(plan.bounds).every((n) => n >= 1), context).toBe(true);
      expect(plan.chains.flat().sort((a, b) => a - b), context).toEqual(workers.map((w) => w.rank));
    }
  });
});

/** The lexicographic optimum over every order of the sorted groups and every split (null: nothing fits). */
function bruteForce(inp: StagePlanInput): { first: number; second: number } | null {
  const { layers, workers, stages: S, microBatches: M, schedule, optimizerStateFactor: f, baseBytes } = inp;
  const D = workers.length / S;
  const fastest = Math.max(...workers.map((w) => w.samplesPerS));
  const sorted = [...workers].sort((a, b) => (b.memoryBytes ?? Infinity) - (a.memoryBytes ?? Infinity) || b.samplesPerS - a.samplesPerS || a.rank - b.rank);
  const groups = Array.from({ length: S }, (_, k) => {
    const m = sorted.slice(k * D, (k + 1) * D);
    const caps = m.map((w) => w.memoryBytes).filter((c): c is number => c !== null);
    return { cap: caps.length ? Math.min(...caps) : null, speed: Math.min(...m.map((w) => w.samplesPerS)) / fastest };
  });
  const memoryObjective = workers.every((w) => w.memoryBytes !== null);
  const perms = (xs: number[]): number[][] => (xs.length <= 1 ? [xs] : xs.flatMap((x, i) => perms([...xs.slice(0, i), ...xs.slice(i + 1)]).map((p) => [x, ...p])));
  const splits = (lo: number, left: number): number[][] => {
    if (left === 1) return [[layers.length]];
    const out: number[][] = [];
    for (let b = lo + 1; b <= layers.length - left + 1; b++) for (const rest of splits(b, left - 1)) out.push([b, ...rest]);
    return out;
  };
  let best: { first: number; second: number } | null = null;
  for (const order of perms([...Array(S).keys()])) {
    for (const ends of splits(0, S)) {
      let fr = 0;
      let co = 0;
      let fits = true;
      let lo = 0;
      ends.forEach((hi, s) => {
        const seg = layers.slice(lo, hi);
        const g = groups[order[s]!]!;
        const inFlight = schedule === "gpipe" ? M : Math.min(S - s, M);
        const mem = baseBytes + seg.reduce((a, l) => a + l.param_bytes, 0) * (2 + f) + seg.reduce((a, l) => a + l.saved_bytes, 0) * inFlight + 2 * Math.max(...seg.map((l) => l.activation_bytes));
        if (g.cap !== null) {
          fr = Math.max(fr, mem / g.cap);
          if (mem > g.cap) fits = false;
        }
        co = Math.max(co, seg.reduce((a, l) => a + l.forward_backward_s, 0) / g.speed);
        lo = hi;
      });
      if (!fits) continue;
      const cand = memoryObjective ? { first: fr, second: co } : { first: co, second: fr };
      if (!best || cand.first < best.first * (1 - 1e-12) || (cand.first <= best.first * (1 + 1e-12) && cand.second < best.second)) best = cand;
    }
  }
  return best;
}
