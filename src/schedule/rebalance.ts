import { proportionalShares } from "./shares.js";

export interface RebalancerOptions {
  /** Most measurements of a worker whose median is its rate, default 30 (fewer after a change). */
  window?: number;
  hysteresis?: number; // relative change in predicted step time needed to change shares, default 0.05
  minShare?: number; // default 1
}

/** A measurement this far (relative) from a worker's rate is beyond timing noise, at the least... */
export const LEVEL_SHIFT = 0.25;

/** ... and beyond this many times the spread of the worker's timings. */
const LEVEL_SHIFT_Z = 4;

/** The latest measurements that are compared with the older ones for a drift. */
const RECENT = 5;

/** The least relative drift of the latest measurements' median that restarts a rate... */
const DRIFT = 0.1;

/** ... and beyond this many standard errors of the difference of the two medians. */
const DRIFT_Z = 5;

/**
 * A worker's share changing by more than this (relative) restarts its rate: with seconds per
 * step that do not grow with the share (a worker's fixed costs), samples / seconds measured
 * under a quite different share are not the rate under this one. Smaller moves keep it.
 */
const SHARE_CHANGE = 0.25;

/** Step-to-step changes of a worker's timings its spread is taken from. */
const SPREAD_OF = 60;

/**
 * Observations in a row that must favour a new split before shares move without a worker's
 * rate having just changed: medians of several workers wandering apart by chance must not move them.
 */
const CONFIRM = 3;

/**
 * One worker's throughput: the median of its measurements since its rate last changed (at
 * most `window` of them), so that noise averages out the longer a rate holds and a one-off
 * slow step does not move it.
 *
 * A change shows in one of two ways. A measurement far off the rate (LEVEL_SHIFT, or
 * LEVEL_SHIFT_Z times the spread of the worker's timings, whichever is more) is held back as
 * a suspect: alone it is an outlier (a GC pause, a neighbour's burst) and is dropped; two in
 * a row off in the same direction are a level shift (throttling, a co-tenant), and the rate
 * starts afresh from them. A smaller change shows as the median of the latest RECENT
 * measurements drifting from the older ones' (by DRIFT, or DRIFT_Z standard errors, whichever
 * is more): the rate starts afresh from the latest. A measurement under a share more than
 * SHARE_CHANGE off the one the rate was measured under starts it afresh too, as news of a
 * change only if the next one agrees and both are a level shift off the rate before. The
 * spread is that of the step-to-step changes of the logarithm (a rate that halves and one
 * that doubles are as far off), over restarts too: a busy host stays as noisy. Until the
 * first measurement the rate is the prior (a profile, in whatever unit).
 */
export class RateEstimate {
  readonly #window: number;
  readonly #prior: number;
  #recent: number[] = [];
  #suspect: number | null = null;
  /** The share the measurements in #recent were taken under (the first of them). */
  #share = 0;
  /** |log change| between consecutive kept measurements, the latest SPREAD_OF. */
  #steps: number[] = [];
  /** Two measurements have agreed on a rate since the start. */
  #agreed = false;
  /** The rate before a restart for another share (null: none since the last change). */
  #before: number | null = null;

  constructor(prior: number, window: number) {
    this.#prior = prior;
    this.#window = window;
  }

  get value(): number {
    return this.#recent.length > 0 ? median(this.#recent) : this.#prior;
  }

  get prior(): number {
    return this.#prior;
  }

  /** Measurements behind the rate (0: still the prior). */
  get count(): number {
    return this.#recent.length;
  }

  /** The standard deviation of one measurement's logarithm, from its step-to-step changes (0: none seen yet). */
  get spread(): number {
    // |difference| of two: its median is 0.6745 sqrt(2) sigma for normal noise.
    return this.#steps.length > 0 ? median(this.#steps) / (0.6745 * Math.SQRT2) : 0;
  }

  /** Relative standard error of the rate (0 until a spread is seen). */
  get standardError(): number {
    return this.#recent.length > 0 ? (1.2533 * this.spread) / Math.sqrt(this.#recent.length) : 0;
  }

  /** How far off (in log) a measurement is beyond noise. */
  #shiftLimit(): number {
    return Math.max(Math.log(1 + LEVEL_SHIFT), LEVEL_SHIFT_Z * this.spread);
  }

  #keep(m: number): void {
    const last = this.#recent[this.#recent.length - 1];
    this.#steps.push(Math.abs(Math.log(m / last)));
    if (this.#steps.length > SPREAD_OF) this.#steps.shift();
    this.#recent.push(m);
    if (this.#recent.length > this.#window) this.#recent.shift();
  }

  /**
   * Take one measurement: `samples` computed in `seconds`. Returns "started" when the first two
   * measurements agree (the prior is gone), "changed" when the rate has just become one that
   * several measurements agree on after a level shift or a drift (either: the evidence to move
   * shares at once), "outlier" when it was held back, else "kept".
   */
  add(samples: number, seconds: number): "started" | "changed" | "outlier" | "kept" {
    const m = samples / seconds;
    if (this.#recent.length === 0 || Math.abs(Math.log(samples / this.#share)) > Math.log(1 + SHARE_CHANGE)) {
      // The first measurement, or one under quite another share: the rate starts afresh, and
      // is news of a change only when the next measurement agrees and both are a level shift
      // off the rate before.
      this.#before = this.#recent.length > 0 ? this.value : null;
      this.#recent = [m];
      this.#share = samples;
      this.#suspect = null;
      return "kept";
    }
    const rate = this.value;
    const off = Math.log(m / rate);
    if (Math.abs(off) > this.#shiftLimit()) {
      const suspect = this.#suspect;
      if (suspect !== null && Math.sign(suspect - rate) === Math.sign(off)) {
        this.#recent = [suspect, m];
        this.#suspect = null;
        this.#before = null;
        this.#agreed = true;
        return "changed";
      }
      this.#suspect = m;
      return "outlier";
    }
    this.#suspect = null;
    this.#keep(m);
    if (this.#recent.length === 2) {
      const before = this.#before;
      this.#before = null;
      if (!this.#agreed) {
        this.#agreed = true;
        return "started";
      }
      if (before !== null && Math.abs(Math.log(this.value / before)) > this.#shiftLimit()) return "changed";
    }
    if (this.#recent.length >= 3 * RECENT) {
      const older = this.#recent.slice(0, -RECENT);
      const latest = this.#recent.slice(-RECENT);
      // 1.2533 / sqrt(n): a median's standard error; the two medians' errors add.
      const se = 1.2533 * this.spread * Math.sqrt(1 / RECENT + 1 / older.length);
      if (Math.abs(Math.log(median(latest) / median(older))) > Math.max(Math.log(1 + DRIFT), DRIFT_Z * se)) {
        this.#recent = latest;
        return "changed";
      }
    }
    return "kept";
  }
}

/**
 * Keeps batch shares proportional to each worker's measured throughput as it drifts (thermal
 * throttling, a neighbour on the same GPU), without letting measurement noise move shares.
 *
 * Each observation is of a step's reports: the samples each worker computed (the shares that
 * step ran with, whatever was decided since) and its seconds. Rates are per sample of what a
 * worker ran (a share moved by more than SHARE_CHANGE restarts its rate), and the rebalancer
 * keeps no state of past decisions but the shares last decided, which a move is weighed
 * against: when orders go out ahead of reports (shares decided after step t first run at
 * step t + 2), the step between reports the old shares, tells the same rates, and does not
 * move shares twice for one change.
 */
export class Rebalancer {
  readonly #batchSize: number;
  readonly #hysteresis: number;
  readonly #minShare: number;
  readonly #estimates: RateEstimate[];
  #shares: number[];
  /** Consecutive observations so far in which a new split would have paid off. */
  #pending = 0;
  /** The latest observations' common levels (see observe). */
  #levels: number[] = [];

  constructor(batchSize: number, initialRates: number[], opts: RebalancerOptions = {}) {
    const window = opts.window ?? 30;
    this.#hysteresis = opts.hysteresis ?? 0.05;
    this.#minShare = opts.minShare ?? 1;
    if (initialRates.length === 0) throw new Error("no workers to rebalance");
    if (!initialRates.every((r) => Number.isFinite(r) && r > 0)) throw new Error(`initial rates must be positive, got ${initialRates.join(", ")}`);
    if (!(Number.isInteger(window) && window >= 1)) throw new Error(`window must be a positive integer, got ${window}`);
    if (!(this.#hysteresis >= 0)) throw new Error(`hysteresis must be >= 0, got ${this.#hysteresis}`);
    if (!Number.isInteger(this.#minShare) || this.#minShare < 0) throw new Error(`minShare must be a non-negative integer, got ${this.#minShare}`);
    if (!Number.isInteger(batchSize) || batchSize < this.#minShare * initialRates.length) {
      throw new Error(`batchSize ${batchSize} cannot give ${initialRates.length} workers at least ${this.#minShare} samples each`);
    }
    this.#batchSize = batchSize;
    this.#estimates = initialRates.map((r) => new RateEstimate(r, window));
    this.#shares = sharesWithFloor(batchSize, initialRates, this.#minShare);
  }

  get shares(): number[] {
    return [...this.#shares];
  }

  /**
   * Estimated samples/s per worker: its rate against the others' (what the split follows),
   * at the host's recent common level. A worker not measured yet keeps its initial rate
   * against the others' (a profile's unit is not samples/s).
   */
  get rates(): number[] {
    const level = this.#levels.length > 0 ? median(this.#levels) : 1;
    return this.#estimates.map((e) => e.value * level);
  }

  /**
   * Feed one step's measurements (per worker: samples computed, compute seconds); returns the
   * shares to order next. Shares move when the new split beats the one last decided by more
   * than `hysteresis` plus the rates' standard error: at once when a worker's rate has just
   * changed (its first two measurements agree, a level shift, a drift), else on three
   * observations in a row. A single far-off measurement moves nothing.
   */
  observe(samples: number[], computeS: number[]): number[] {
    const n = this.#estimates.length;
    if (samples.length !== n || computeS.length !== n) throw new Error(`expected ${n} measurements, got ${samples.length} samples and ${computeS.length} times`);
    // A worker that computed nothing (or reported no time) tells us nothing about its speed.
    const measured = samples.map((x, i) => x > 0 && computeS[i] > 0 && Number.isFinite(x / computeS[i]));
    const offs = this.#estimates.flatMap((e, i) => (measured[i] ? [Math.log(samples[i] / computeS[i] / e.value)] : []));
    if (offs.length === 0) return this.shares;
    // Rates are kept against each other: each measurement is divided by the step's common
    // level, the median of how far each worker's measurement is off its rate. A load that
    // slows every worker alike (a busy host) then moves no rate and adds nothing to their
    // spread, and one worker's change (n >= 3) does not move the others'.
    const level = Math.exp(median(offs));
    this.#levels.push(level);
    if (this.#levels.length > RECENT) this.#levels.shift();
    let started = false;
    let changed = false;
    this.#estimates.forEach((e, i) => {
      if (!measured[i]) return;
      const news = e.add(samples[i], computeS[i] * level);
      if (news === "started") started = true;
      if (news === "changed") changed = true;
    });
    const rates = this.rates;
    const candidate = sharesWithFloor(this.#batchSize, rates, this.#minShare);
    const keep = predictedComputeS(this.#shares, rates);
    const next = predictedComputeS(candidate, rates);
    // A move must pay off by more than the hysteresis plus the rates' own uncertainty (a
    // busy host's timings swing by a fifth from step to step): noise must not move shares.
    // Not the first move from the initial rates, which no measurement backs.
    const uncertainty = started ? 0 : Math.max(...this.#estimates.map((e) => e.standardError));
    if (next < keep * (1 - this.#hysteresis - uncertainty)) this.#pending += 1;
    else this.#pending = 0;
    if (this.#pending > 0 && (started || changed || this.#pending >= CONFIRM)) {
      this.#shares = candidate;
      this.#pending = 0;
    }
    return this.shares;
  }
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Step compute time: every worker waits for the slowest before the all-reduce. */
function predictedComputeS(shares: number[], rates: number[]): number {
  return Math.max(...shares.map((s, i) => s / rates[i]));
}

/**
 * Proportional shares with every worker at least `min`: pin those that fall below to `min` and
 * split the rest among the others, repeating until none falls below. Callers ensure
 * total >= min * n, so the unpinned set never empties.
 */
export function sharesWithFloor(total: number, weights: number[], min: number): number[] {
  const pinned = new Set<number>();
  for (;;) {
    const free = weights.map((_, i) => i).filter((i) => !pinned.has(i));
    const part = proportionalShares(total - min * pinned.size, free.map((i) => weights[i]));
    const low = free.filter((_, k) => part[k] < min);
    if (low.length === 0) {
      const shares = new Array<number>(weights.length).fill(min);
      free.forEach((i, k) => (shares[i] = part[k]));
      return shares;
    }
    for (const i of low) pinned.add(i);
  }
}
