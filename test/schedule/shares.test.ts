import { describe, expect, it } from "vitest";
import { equalShares, proportionalShares, slicesFor } from "../../src/schedule/shares.js";
import { seededRandom } from "../helpers/random.js";


const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);

describe("proportionalShares", () => {
  it("gives non-negative integers summing exactly to the total, each within 1 sample of its exact share", () => {
    const rand = seededRandom(42);
    for (let trial = 0; trial < 2000; trial++) {
      const n = 1 + Math.floor(rand() * 12);
      const total = Math.floor(rand() * (trial % 3 === 0 ? 100_000 : 300));
      const weights = Array.from({ length: n }, () => {
        const r = rand();
        // Mix tiny, zero, huge and fractional weights, keeping at least one positive.
        return r < 0.1 ? 0 : r < 0.2 ? 1e-6 * rand() : r < 0.3 ? 1e6 * rand() : rand() * 10;
      });
      if (sum(weights) === 0) weights[0] = 1;
      const shares = proportionalShares(total, weights);
      const context = JSON.stringify({ total, weights, shares });
      expect(shares, context).toHaveLength(n);
      expect(sum(shares), context).toBe(total);
      const wsum = sum(weights);
      shares.forEach((s, i) => {
        expect(Number.isInteger(s) && s >= 0, context).toBe(true);
        const exact = (total * weights[i]) / wsum;
        expect(Math.abs(s - exact), context).toBeLessThan(1 + 1e-9);
      });
    }
  });

  it("gives a zero-weight worker nothing", () => {
    expect(proportionalShares(64, [0, 1, 3])).toEqual([0, 16, 48]);
    expect(proportionalShares(7, [0, 1, 0])).toEqual([0, 7, 0]);
  });

  it("splits 32 and 64 samples 1:7:24", () => {
    expect(proportionalShares(32, [1, 7, 24])).toEqual([1, 7, 24]);
    expect(proportionalShares(64, [1, 7, 24])).toEqual([2, 14, 48]);
  });

  it("scales with the weights, not their units", () => {
    expect(proportionalShares(64, [100, 700, 2400])).toEqual(proportionalShares(64, [1, 7, 24]));
    expect(proportionalShares(1000, [0.3, 0.3, 0.4])).toEqual([300, 300, 400]);
  });

  it("gives the leftover samples to the largest remainders", () => {
    // Exact shares 3.33, 3.67 -> 3, 4: the larger fraction gets the extra sample.
    expect(proportionalShares(7, [10, 11])).toEqual([3, 4]);
    // 10 * [0.15, 0.25, 0.6] = 1.5, 2.5, 6: the two .5 remainders tie; one sample left goes to the lower rank.
    expect(proportionalShares(10, [0.15, 0.25, 0.6])).toEqual([2, 2, 6]);
  });

  it("is deterministic: the same inputs give the same split", () => {
    const rand = seededRandom(7);
    const weights = Array.from({ length: 9 }, () => rand());
    expect(proportionalShares(1001, weights)).toEqual(proportionalShares(1001, [...weights]));
  });

  it("refuses to share among no workers or with weights that do not sum to a positive number", () => {
    expect(() => proportionalShares(10, [])).toThrow(/no workers/);
    expect(() => proportionalShares(10, [0, 0])).toThrow(/positive/);
    expect(() => proportionalShares(10, [1, Number.NaN])).toThrow(/positive/);
  });

  it("handles a total of 0", () => {
    expect(proportionalShares(0, [1, 2, 3])).toEqual([0, 0, 0]);
  });
});

describe("equalShares", () => {
  it("gives the remainder to the lowest ranks", () => {
    expect(equalShares(64, 3)).toEqual([22, 21, 21]);
    expect(equalShares(10, 4)).toEqual([3, 3, 2, 2]);
    expect(equalShares(2, 5)).toEqual([1, 1, 0, 0, 0]);
    expect(equalShares(12, 4)).toEqual([3, 3, 3, 3]);
  });

  it("matches floor(total/N) + (rank < total % N) for many totals and worker counts", () => {
    for (let workers = 1; workers <= 17; workers++) {
      for (let total = 0; total <= 200; total += 1 + (total % 7)) {
        const expected = Array.from({ length: workers }, (_, r) => Math.floor(total / workers) + (r < total % workers ? 1 : 0));
        expect(equalShares(total, workers), `${total}/${workers}`).toEqual(expected);
      }
    }
  });
});

describe("slicesFor", () => {
  it("cuts [0, total) into contiguous slices that cover it exactly, in rank order", () => {
    const rand = seededRandom(99);
    for (let trial = 0; trial < 500; trial++) {
      const n = 1 + Math.floor(rand() * 10);
      const total = Math.floor(rand() * 5000);
      const weights = Array.from({ length: n }, () => 0.1 + rand());
      const slices = slicesFor(total, weights);
      expect(slices).toHaveLength(n);
      let next = 0;
      for (const s of slices) {
        expect(s.start).toBe(next);
        expect(s.count).toBeGreaterThanOrEqual(0);
        next += s.count;
      }
      expect(next).toBe(total);
      expect(slices.map((s) => s.count)).toEqual(proportionalShares(total, weights));
    }
  });

  it("splits 1000 validation samples over 3 equal workers", () => {
    expect(slicesFor(1000, [1, 1, 1])).toEqual([
      { start: 0, count: 334 },
      { start: 334, count: 333 },
      { start: 667, count: 333 },
    ]);
  });
});
