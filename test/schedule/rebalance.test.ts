import { describe, expect, it } from "vitest";
import { RateEstimate, Rebalancer, sharesWithFloor } from "../../src/schedule/rebalance.js";
import { seededRandom } from "../helpers/random.js";

const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
/** Real step compute time under the true rates: everyone waits for the slowest. */
const stepS = (shares: number[], rates: number[]) => Math.max(...shares.map((s, i) => s / rates[i]));
/** Best achievable step time: the batch spread over the total rate. */
const idealS = (batch: number, rates: number[]) => batch / sum(rates);

/** Run one step with `trueRates` (times optionally jittered) and feed it back. */
function step(r: Rebalancer, trueRates: number[], jitter?: () => number): number[] {
  const shares = r.shares;
  const times = shares.map((s, i) => (s / trueRates[i]) * (jitter ? jitter() : 1));
  const next = r.observe(shares, times);
  expect(sum(next)).toBe(sum(shares));
  next.forEach((x) => expect(Number.isInteger(x) && x >= 1).toBe(true));
  return next;
}

/** A worker's truth at step t: seconds per sample, and seconds per step whatever its share. */
interface Truth {
  rates: number[];
  /** Per-step seconds in every measurement (default none). */
  fixedS?: number[];
}

/** Best step time for `truth`: every worker busy for the same time T, shares summing to batch. */
function bestS(batch: number, { rates, fixedS }: Truth): number {
  const f = fixedS ?? rates.map(() => 0);
  return (batch + sum(rates.map((r, i) => r * f[i]))) / sum(rates);
}

/**
 * Run `steps` steps with the truth `truthAt(t)`, shares decided after step t's reports first
 * running at step t + 1 + lag (lag 1: the coordinator sends step t+1's orders before step t's
 * reports are in). `noise(i, t)` multiplies worker i's time at step t. Returns the shares each
 * step ran with and its step time against the best for that step's truth.
 */
function simulate(opts: { batch: number; initial: number[]; steps: number; lag: 0 | 1; truthAt: (t: number) => Truth; noise?: (i: number, t: number) => number }) {
  const r = new Rebalancer(opts.batch, opts.initial);
  const inEffect: number[][] = [r.shares, r.shares]; // inEffect[t]: shares step t runs with
  const ran: { shares: number[]; stepS: number; bestS: number }[] = [];
  for (let t = 0; t < opts.steps; t++) {
    const shares = inEffect[t];
    const truth = opts.truthAt(t);
    const f = truth.fixedS ?? truth.rates.map(() => 0);
    const times = shares.map((s, i) => (f[i] + s / truth.rates[i]) * (opts.noise ? opts.noise(i, t) : 1));
    ran.push({ shares, stepS: Math.max(...times), bestS: bestS(opts.batch, truth) });
    const decided = r.observe(shares, times);
    expect(sum(decided)).toBe(opts.batch);
    if (opts.lag === 0) inEffect[t + 1] = decided;
    else inEffect[t + 2] = decided;
    inEffect[t + 1] ??= inEffect[t];
  }
  return ran;
}

/** Steps from `from` until a step runs within `tolerance` of its best (Infinity: never). */
function stepsToWithin(ran: { stepS: number; bestS: number }[], from: number, tolerance = 0.1): number {
  for (let t = from; t < ran.length; t++) if (ran[t].stepS <= (1 + tolerance) * ran[t].bestS) return t - from;
  return Infinity;
}

/** How many times the shares in effect changed over `ran[from..]`. */
function changes(ran: { shares: number[] }[], from = 1): number {
  let n = 0;
  for (let t = Math.max(1, from); t < ran.length; t++) if (ran[t].shares.join() !== ran[t - 1].shares.join()) n += 1;
  return n;
}

describe("RateEstimate", () => {
  /** One measurement of `rate` samples/s at a share of 100. */
  const at = (e: RateEstimate, rate: number, share = 100) => e.add(share, share / rate);

  it("is the median of its recent measurements, the prior until the first", () => {
    const e = new RateEstimate(5, 5);
    expect(e.value).toBe(5);
    expect(at(e, 100)).toBe("kept");
    expect(e.value).toBe(100);
    expect(at(e, 110)).toBe("started"); // two agree
    for (const m of [90, 120, 85, 105, 95]) expect(at(e, m)).toBe("kept");
    expect(e.value).toBeCloseTo(95, 9); // of the last 5: 120, 85, 105, 95 and 90
    expect(e.count).toBe(5);
  });

  it("drops one far-off measurement; two in a row in one direction restart it", () => {
    const e = new RateEstimate(1, 7);
    for (const m of [100, 100, 100, 100]) at(e, m);
    expect(at(e, 30)).toBe("outlier");
    expect(e.value).toBe(100);
    expect(at(e, 101)).toBe("kept");
    expect(at(e, 30)).toBe("outlier");
    expect(at(e, 200)).toBe("outlier"); // far off, but the other way: still no shift
    expect(e.value).toBe(100);
    expect(at(e, 210)).toBe("changed");
    expect(e.value).toBeCloseTo(205, 9);
    expect(e.count).toBe(2);
  });

  it("a drift of the latest measurements' median restarts it from them", () => {
    const e = new RateEstimate(1, 30);
    for (let k = 0; k < 20; k++) at(e, 100);
    expect(at(e, 85)).toBe("kept"); // 15% off: not a level shift
    expect(at(e, 85)).toBe("kept");
    expect(e.value).toBe(100);
    expect(at(e, 85)).toBe("changed"); // the median of the last 5 is now 85
    expect(e.value).toBeCloseTo(85, 9);
    expect(e.count).toBe(5);
  });

  it("on a noisy host takes a larger change as a level shift, and its standard error says how noisy", () => {
    const rand = seededRandom(5);
    const e = new RateEstimate(1, 30);
    for (let k = 0; k < 30; k++) at(e, 100 * (0.7 + 0.6 * rand()));
    const se = e.standardError;
    expect(se).toBeGreaterThan(0.03);
    expect(se).toBeLessThan(0.1);
    expect(at(e, 70)).toBe("kept"); // 30% off is within its noise
    expect(at(e, 25)).toBe("outlier");
    expect(at(e, 25)).toBe("changed");
    expect(e.standardError).toBeGreaterThan(se); // two measurements at the noise seen so far
  });

  it("a measurement under a share more than 10% different starts it afresh, with no news of a change", () => {
    const e = new RateEstimate(1, 30);
    for (let k = 0; k < 10; k++) at(e, 100);
    expect(at(e, 90, 109)).toBe("kept"); // 9% more samples: the same rate, noise
    expect(e.count).toBe(11);
    expect(at(e, 80, 50)).toBe("kept");
    expect(e.value).toBe(80);
    expect(e.count).toBe(1);
    expect(at(e, 80, 50)).toBe("kept"); // not "changed": the share moved, not the worker
  });
});

describe("Rebalancer", () => {
  it("starts from shares proportional to the initial rates", () => {
    expect(new Rebalancer(70, [4, 2, 1]).shares).toEqual([40, 20, 10]);
    expect(new Rebalancer(70, [1, 1, 1]).shares).toEqual([24, 23, 23]);
  });

  it("moves from equal shares to rate-proportional once two measurements agree", () => {
    const truth = [100, 50, 25];
    const r = new Rebalancer(70, [1, 1, 1]);
    step(r, truth);
    expect(r.shares).toEqual([24, 23, 23]); // one measurement could be a warm-up step
    step(r, truth);
    expect(r.shares).toEqual([40, 20, 10]);
    expect(stepS(r.shares, truth) / idealS(70, truth)).toBeLessThan(1.01);
    for (let k = 0; k < 10; k++) step(r, truth);
    expect(r.shares).toEqual([40, 20, 10]);
    r.rates.forEach((x, i) => expect(x).toBeCloseTo(truth[i], 6));
  });

  it("adopts the first measured split on a noisy host too (no measurement backs the initial rates)", () => {
    // Two DiLoCo rounds of 4 inner steps on a host at load 25 (bench:hetero): the rates swing by 15% between them.
    const r = new Rebalancer(1024, [1, 1, 1]);
    const samples = [1368, 1364, 1364];
    r.observe(samples, [1368 / 278, 1364 / 247, 1364 / 212]);
    expect(r.shares).toEqual([342, 341, 341]);
    r.observe(samples, [1368 / 277, 1364 / 246, 1364 / 180]);
    expect(r.shares).toEqual(sharesWithFloor(1024, r.rates, 1));
    expect(r.shares[0]).toBeGreaterThan(375);
  });

  it("a profile in another unit is scaled to the measured workers' rates until its worker is measured", () => {
    const r = new Rebalancer(60, [20, 10, 10]); // GFLOPS, say
    r.observe([30, 0, 15], [0.3, 0, 0.3]); // rank 1 reported no time
    // Ranks 0 and 2 measured at 100 and 50 samples/s against 20 and 10: rank 1 is taken at 10 x 5 (the geometric mean of 5 and 5).
    expect(r.rates).toEqual([100, 50, 50]);
  });

  it("moves share off a worker that slows 4x two steps after, and back when it recovers", () => {
    const fast = [100, 50, 25];
    const slow = [25, 50, 25];
    const r = new Rebalancer(70, fast);
    for (let k = 0; k < 5; k++) step(r, fast);
    expect(r.shares).toEqual([40, 20, 10]);

    /** Observations after a change until the real step time is within 10% of the ideal. */
    const stepsToWithin10pct = (truth: number[]) => {
      for (let k = 1; k <= 20; k++) {
        step(r, truth);
        if (stepS(r.shares, truth) <= 1.1 * idealS(70, truth)) return k;
      }
      return Infinity;
    };

    // One slow step could be noise, so shares hold for one observation and move on the second.
    expect(stepsToWithin10pct(slow)).toBe(2);
    expect(r.shares).toEqual([18, 35, 17]);
    expect(stepsToWithin10pct(fast)).toBe(2);
    expect(r.shares).toEqual([40, 20, 10]);
  });

  it("a one-off slow step moves nothing, not even the rate", () => {
    for (const lag of [0, 1] as const) {
      const fast = [100, 50, 25];
      const ran = simulate({ batch: 70, initial: fast, steps: 40, lag, truthAt: (t) => ({ rates: t === 20 ? [20, 50, 25] : fast }) });
      expect(changes(ran)).toBe(0);
    }
    // Every worker slow once, at different steps, and all at once.
    const r = new Rebalancer(70, [100, 50, 25]);
    for (let k = 0; k < 5; k++) step(r, [100, 50, 25]);
    const settled = r.shares;
    for (const slowOnce of [[30, 50, 25], [100, 10, 25], [100, 50, 5], [30, 15, 7]]) {
      expect(step(r, slowOnce)).toEqual(settled);
      expect(step(r, [100, 50, 25])).toEqual(settled);
    }
    r.rates.forEach((x, i) => expect(x).toBeCloseTo([100, 50, 25][i], 6));
  });

  it("converges within 2 steps of a step change (3 with one step of lag) and then holds", () => {
    const before = [100, 50, 25];
    const after = [25, 50, 25];
    const at = 20;
    for (const lag of [0, 1] as const) {
      const ran = simulate({ batch: 1024, initial: [1, 1, 1], steps: 60, lag, truthAt: (t) => ({ rates: t < at ? before : after }) });
      expect(stepsToWithin(ran, at)).toBe(2 + lag);
      expect(stepsToWithin(ran, at, 0.01)).toBe(2 + lag);
      expect(changes(ran, at)).toBe(1); // one move, no correction after it
      expect(ran[ran.length - 1].shares).toEqual([256, 512, 256]);
    }
  });

  it("with per-step fixed seconds in the measurements, converges near the best split without oscillating, with or without lag", () => {
    // Measured rates are samples / (fixed + samples / rate): not proportional to speed, so the
    // first move after the change is not the last. Each later move must go the same way.
    const at = 20;
    const truthAt = (t: number): Truth => ({ rates: t < at ? [4000, 2000, 1000] : [1000, 2000, 1000], fixedS: [0.03, 0.03, 0.03] });
    for (const lag of [0, 1] as const) {
      const ran = simulate({ batch: 1024, initial: [1, 1, 1], steps: 80, lag, truthAt });
      expect(stepsToWithin(ran, at)).toBeLessThanOrEqual(2 + lag);
      expect(stepsToWithin(ran, at, 0.06)).toBeLessThanOrEqual(10);
      const share0 = ran.slice(at).map((s) => s.shares[0]);
      for (let k = 1; k < share0.length; k++) expect(share0[k]).toBeLessThanOrEqual(share0[k - 1]); // only ever down
      expect(changes(ran, at)).toBeLessThanOrEqual(4);
      expect(ran[ran.length - 1].stepS / ran[ran.length - 1].bestS).toBeLessThan(1.06);
    }
  });

  it("under one step of lag, does not move twice for one change nor swing back", () => {
    // The step between a decision and its first step still runs (and reports) the old shares.
    const rand = seededRandom(7);
    const speeds = (t: number) => (t < 30 ? [100, 50, 25] : t < 60 ? [25, 50, 25] : t < 90 ? [25, 50, 100] : [100, 50, 25]);
    const ran = simulate({ batch: 1024, initial: [1, 1, 1], steps: 120, lag: 1, truthAt: (t) => ({ rates: speeds(t) }), noise: () => 0.95 + 0.1 * rand() });
    for (const at of [30, 60, 90]) {
      expect(stepsToWithin(ran, at)).toBeLessThanOrEqual(3);
      expect(changes(ran.slice(at - 1, at + 29))).toBe(1);
    }
  });

  it("does not change shares on ±5% timing noise once converged", () => {
    for (const [seed, truth] of [[1, [100, 50, 25]], [2, [100, 50, 25]], [1234, [100, 50, 25]], [3, [30, 70, 120, 45, 80]], [99, [30, 70, 120, 45, 80]]] as const) {
      const rand = seededRandom(seed);
      const jitter = () => 0.95 + 0.1 * rand();
      const r = new Rebalancer(70, truth.map(() => 1));
      for (let k = 0; k < 15; k++) step(r, [...truth]);
      const settled = r.shares;
      for (let k = 0; k < 500; k++) expect(step(r, [...truth], jitter)).toEqual(settled);
    }
  });

  it("on ±20% noise of each worker's own, shares settle near the best split and rarely move, with or without lag", () => {
    for (const lag of [0, 1] as const) {
      for (const seed of [1, 2, 3]) {
        const rand = seededRandom(seed);
        const truth = { rates: [1000, 2000, 1000] };
        const ran = simulate({ batch: 1024, initial: [1, 1, 1], steps: 2000, lag, truthAt: () => truth, noise: () => 0.8 + 0.4 * rand() });
        expect(changes(ran, 20)).toBeLessThanOrEqual(20); // about one move per 100 steps at most
        // Noise-free step time of the shares each step ran with, against the best.
        const off = ran.slice(20).map((s) => stepS(s.shares, truth.rates) / bestS(1024, truth));
        expect(Math.max(...off)).toBeLessThan(1.3);
        expect(off.reduce((a, b) => a + b, 0) / off.length).toBeLessThan(1.05);
      }
    }
  });

  it("a load that slows every worker alike (a busy host) moves no share, however much it swings", () => {
    for (const lag of [0, 1] as const) {
      for (const seed of [1, 2, 3]) {
        const rand = seededRandom(seed);
        const truth = { rates: [1000, 2000, 1000] };
        // ±50% common to all workers from step to step, ±5% each worker's own.
        let common = 1;
        const ran = simulate({
          batch: 1024, initial: [1, 1, 1], steps: 1000, lag, truthAt: () => truth,
          noise: (i) => {
            if (i === 0) common = 0.5 + rand();
            return common * (0.95 + 0.1 * rand());
          },
        });
        expect(changes(ran, 5)).toBe(0);
        expect(stepS(ran[999].shares, truth.rates) / bestS(1024, truth)).toBeLessThan(1.06); // within the hysteresis
      }
    }
  });

  it("keeps the previous rate for a worker that reports 0 samples or 0 time", () => {
    const r = new Rebalancer(30, [10, 10, 10]);
    r.observe([10, 10, 10], [1, 1, 1]);
    r.observe([0, 10, 10], [1, 1, 1]);
    r.observe([10, 10, 10], [1, 0, 1]);
    expect(r.rates).toEqual([10, 10, 10]);
    expect(() => r.observe([1, 1], [1, 1])).toThrow();
  });

  it("holds every worker at minShare or more, summing exactly", () => {
    const r = new Rebalancer(20, [1000, 1000, 1], { minShare: 2 });
    expect(r.shares).toEqual([9, 9, 2]);
    expect(() => new Rebalancer(5, [1, 1, 1], { minShare: 2 })).toThrow();
    const rand = seededRandom(99);
    for (let t = 0; t < 300; t++) {
      const n = 1 + Math.floor(rand() * 6);
      const min = Math.floor(rand() * 4);
      const total = min * n + Math.floor(rand() * 200);
      const weights = Array.from({ length: n }, () => 0.01 + rand() * (rand() < 0.3 ? 1 : 500));
      const s = sharesWithFloor(total, weights, min);
      expect(sum(s)).toBe(total);
      s.forEach((x) => expect(Number.isInteger(x) && x >= min).toBe(true));
    }
  });

  it("a drift too small for a level shift moves shares on its third measurement", () => {
    const r = new Rebalancer(70, [1, 1, 1]);
    for (let k = 0; k < 20; k++) step(r, [100, 50, 25]);
    expect(r.shares).toEqual([40, 20, 10]);
    // Rank 0 at 85 (15% off: not a level shift): the median of its last 5 has moved on the third.
    const seen: string[] = [];
    for (let k = 0; k < 5; k++) seen.push(step(r, [85, 50, 25]).join(":"));
    expect(seen).toEqual(["40:20:10", "40:20:10", "37:22:11", "37:22:11", "37:22:11"]);
  });

  it("a drift that does not pay off by more than the hysteresis moves nothing", () => {
    const r = new Rebalancer(70, [1, 1, 1]);
    for (let k = 0; k < 20; k++) step(r, [100, 50, 25]);
    for (let k = 0; k < 40; k++) expect(step(r, [100, 50, 23.9])).toEqual([40, 20, 10]); // 4.4% slower
  });
});
