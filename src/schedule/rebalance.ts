import { proportionalShares } from "./shares.js";

export interface RebalancerOptions {
  smoothing?: number; // EMA factor for new rates, default 0.5
  hysteresis?: number; // relative change in predicted step time needed to change shares, default 0.05
  minShare?: number; // default 1
}

/** A measurement this far (relative) from the smoothed rate is beyond timing noise. */
const LEVEL_SHIFT = 0.25;

/**
 * Observations in a row that must favour a new split before it is adopted. With ±5% timing
 * jitter and the defaults, 2 still moved shares about once per 2,000 steps (4 equal workers,
 * indivisible batch); 3 about once per 25,000, at the cost of one more step to react.
 */
const CONFIRM = 3;

/**
 * Keeps batch shares proportional to each worker's measured throughput as it drifts (thermal
 * throttling, a neighbour on the same GPU), without letting measurement noise move shares.
 */
export class Rebalancer {
  readonly #batchSize: number;
  readonly #smoothing: number;
  readonly #hysteresis: number;
  readonly #minShare: number;
  #rates: number[];
  #shares: number[];
  /** Per worker: the direction (+1/-1) of the last measurement's large deviation, else 0. */
  #shift: number[];
  /** Consecutive observations so far in which a new split would have paid off. */
  #pending = 0;

  constructor(batchSize: number, initialRates: number[], opts: RebalancerOptions = {}) {
    this.#smoothing = opts.smoothing ?? 0.5;
    this.#hysteresis = opts.hysteresis ?? 0.05;
    this.#minShare = opts.minShare ?? 1;
    if (initialRates.length === 0) throw new Error("no workers to rebalance");
    if (!initialRates.every((r) => Number.isFinite(r) && r > 0)) throw new Error(`initial rates must be positive, got ${initialRates.join(", ")}`);
    if (!(this.#smoothing > 0 && this.#smoothing <= 1)) throw new Error(`smoothing must be in (0, 1], got ${this.#smoothing}`);
    if (!(this.#hysteresis >= 0)) throw new Error(`hysteresis must be >= 0, got ${this.#hysteresis}`);
    if (!Number.isInteger(this.#minShare) || this.#minShare < 0) throw new Error(`minShare must be a non-negative integer, got ${this.#minShare}`);
    if (!Number.isInteger(batchSize) || batchSize < this.#minShare * initialRates.length) {
      throw new Error(`batchSize ${batchSize} cannot give ${initialRates.length} workers at least ${this.#minShare} samples each`);
    }
    this.#batchSize = batchSize;
    this.#rates = [...initialRates];
    this.#shift = initialRates.map(() => 0);
    this.#shares = sharesWithFloor(batchSize, this.#rates, this.#minShare);
  }

  get shares(): number[] {
    return [...this.#shares];
  }

  /** Smoothed samples/s per worker. */
  get rates(): number[] {
    return [...this.#rates];
  }

  /**
   * Feed one step's measurements (per worker: samples computed, compute seconds); returns the shares for the next step.
   * Shares change only when the new split beats the current one by more than `hysteresis` on three observations in a row.
   */
  observe(samples: number[], computeS: number[]): number[] {
    const n = this.#rates.length;
    if (samples.length !== n || computeS.length !== n) throw new Error(`expected ${n} measurements, got ${samples.length} samples and ${computeS.length} times`);
    const a = this.#smoothing;
    this.#rates = this.#rates.map((prev, i) => {
      // A worker that computed nothing (or reported no time) tells us nothing about its speed.
      const m = samples[i] / computeS[i];
      if (!(samples[i] > 0 && computeS[i] > 0) || !Number.isFinite(m)) return prev;
      // Two measurements in a row far off in the same direction are a level shift (throttling,
      // a co-tenant), not noise: jump to it rather than let the EMA lag for several steps.
      // A single outlier (a GC pause) still only moves the EMA.
      const dir = Math.abs(m / prev - 1) > LEVEL_SHIFT ? Math.sign(m - prev) : 0;
      const shifted = dir !== 0 && dir === this.#shift[i];
      this.#shift[i] = shifted ? 0 : dir;
      return shifted ? m : a * m + (1 - a) * prev;
    });
    const candidate = sharesWithFloor(this.#batchSize, this.#rates, this.#minShare);
    const keep = predictedComputeS(this.#shares, this.#rates);
    const next = predictedComputeS(candidate, this.#rates);
    // Only move when it pays off clearly, several times in a row: a short noisy excursion past the
    // threshold (the smoothed rates of several workers drifting apart by chance) must not move
    // shares, since shares that flap cost more than they gain.
    if (next < keep * (1 - this.#hysteresis)) this.#pending += 1;
    else this.#pending = 0;
    if (this.#pending >= CONFIRM) {
      this.#shares = candidate;
      this.#pending = 0;
    }
    return this.shares;
  }
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
