import { describe, expect, it } from "vitest";
import { allocate, type WorkerCapability } from "../../src/schedule/allocate.js";

const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
const w = (id: string, samplesPerS: number, linkBytesPerS?: number): WorkerCapability => ({ id, samplesPerS, linkBytesPerS });

describe("allocate", () => {
  it("splits in proportion to throughput: 1 : 0.5 : 0.25 of 70 is 40 : 20 : 10", () => {
    const a = allocate({ batchSize: 70, workers: [w("a", 1), w("b", 0.5), w("c", 0.25)], stepBytesPerWorker: 0 });
    expect(a.shares).toEqual([40, 20, 10]);
    expect(a.excluded).toEqual([]);
    expect(a.predictedStepS).toBeCloseTo(40, 9);
  });

  it("keeps uneven splits like 1 : 7 : 24 exact, and sums exactly when they do not divide", () => {
    expect(allocate({ batchSize: 64, workers: [w("a", 1), w("b", 7), w("c", 24)], stepBytesPerWorker: 0 }).shares).toEqual([2, 14, 48]);
    const odd = allocate({ batchSize: 67, workers: [w("a", 1), w("b", 7), w("c", 24)], stepBytesPerWorker: 0 });
    expect(sum(odd.shares)).toBe(67);
    odd.shares.forEach((s, i) => expect(Math.abs(s - (67 * [1, 7, 24][i]) / 32)).toBeLessThan(1));
  });

  it("adds the ring time of the slowest included link to the prediction", () => {
    const a = allocate({ batchSize: 20, workers: [w("a", 100, 1e8), w("b", 100, 5e7)], stepBytesPerWorker: 1e6 });
    expect(a.shares).toEqual([10, 10]);
    expect(a.predictedStepS).toBeCloseTo(0.1 + 1e6 / 5e7, 9);
  });

  it("leaves out a worker whose slow link would dominate every step, naming the figures", () => {
    const a = allocate({
      batchSize: 36,
      workers: [w("a", 100, 1e9), w("b", 100, 2e6), w("c", 100)],
      stepBytesPerWorker: 8.2e6,
    });
    expect(a.shares).toEqual([18, 0, 18]);
    expect(a.excluded).toHaveLength(1);
    expect(a.excluded[0].index).toBe(1);
    expect(a.excluded[0].id).toBe("b");
    const r = a.excluded[0].reason;
    expect(r).toMatch(/^worker b: /);
    expect(r).toContain("2.0 MB/s");
    expect(r).toContain("4.10 s");
    expect(r).toContain("0.12 s of compute");
    expect(r).toMatch(/(\d+\.\d)x faster/);
    expect(a.predictedStepS).toBeCloseTo(0.18 + 8.2e6 / 1e9, 9);
  });

  it("leaves out tied slow links together, where dropping only one would gain nothing", () => {
    const a = allocate({
      batchSize: 40,
      workers: [w("a", 100, 1e9), w("b", 100, 1e6), w("c", 100, 1e6), w("d", 100, 1e9)],
      stepBytesPerWorker: 1e6,
    });
    expect(a.shares).toEqual([20, 0, 0, 20]);
    expect(a.excluded.map((e) => e.id)).toEqual(["b", "c"]);
    expect(a.excluded[0].reason).toContain("together with c");
  });

  it("keeps a slow worker and a slower link when they do not cost more than 5%", () => {
    const a = allocate({
      batchSize: 210,
      workers: [w("a", 100, 1e9), w("b", 100, 1e9), w("c", 10, 5e7)],
      stepBytesPerWorker: 1e6,
    });
    expect(a.shares).toEqual([100, 100, 10]);
    expect(a.excluded).toEqual([]);
    // Without c: 105/100 + 0.001 = 1.051 s against 1 + 0.02 = 1.02 s with it.
    expect(a.predictedStepS).toBeCloseTo(1.02, 9);
  });

  it("leaves out a worker so slow that its rounded-up share holds up compute", () => {
    // Exact share 0.87 has the largest remainder, so it rounds up to 1 sample: 0.11 s, while the others need 0.10 s.
    const a = allocate({ batchSize: 30, workers: [w("a", 100), w("b", 100), w("c", 100), w("d", 9)], stepBytesPerWorker: 0 });
    expect(a.shares).toEqual([10, 10, 10, 0]);
    expect(a.excluded).toHaveLength(1);
    expect(a.excluded[0].reason).toBe("worker d: at 9.0 samples/s its share of 1 sample takes 0.11 s against 0.10 s for the others; leaving it out makes steps 1.1x faster");
  });

  it("excludes workers whose share rounds to 0, with the figures", () => {
    const a = allocate({ batchSize: 10, workers: [w("a", 1000), w("b", 1000), w("c", 1)], stepBytesPerWorker: 0 });
    expect(a.shares).toEqual([5, 5, 0]);
    expect(a.excluded).toHaveLength(1);
    expect(a.excluded[0]).toMatchObject({ index: 2, id: "c" });
    expect(a.excluded[0].reason).toContain("rounds to 0");
    expect(a.excluded[0].reason).toContain("1.0 samples/s");
  });

  it("excludes workers with no usable throughput", () => {
    const a = allocate({ batchSize: 8, workers: [w("a", 0), w("b", 4)], stepBytesPerWorker: 0 });
    expect(a.shares).toEqual([0, 8]);
    expect(a.excluded[0].reason).toContain("samplesPerS = 0");
    expect(() => allocate({ batchSize: 8, workers: [w("a", 0)], stepBytesPerWorker: 0 })).toThrow();
  });

  it("never excludes everyone", () => {
    // Every link is terrible: dropping workers removes the ring, but one must stay.
    const bad = allocate({ batchSize: 12, workers: [w("a", 10, 1), w("b", 10, 1), w("c", 10, 1)], stepBytesPerWorker: 1e6 });
    expect(bad.shares.filter((s) => s > 0)).toHaveLength(1);
    expect(sum(bad.shares)).toBe(12);
    expect(bad.excluded).toHaveLength(2);
    expect(bad.predictedStepS).toBeCloseTo(1.2, 9); // alone: no ring
    // A lone worker is kept whatever its link; a batch of 1 goes to exactly one worker.
    expect(allocate({ batchSize: 5, workers: [w("a", 1, 1)], stepBytesPerWorker: 1e9 }).shares).toEqual([5]);
    const one = allocate({ batchSize: 1, workers: [w("a", 1), w("b", 1), w("c", 1)], stepBytesPerWorker: 0 });
    expect(one.shares).toEqual([1, 0, 0]);
    expect(one.excluded).toHaveLength(2);
  });

  it("always returns integer shares summing exactly to the batch", () => {
    let s = 7;
    const rand = () => ((s = (s * 1103515245 + 12345) % 2147483648) / 2147483648);
    for (let t = 0; t < 300; t++) {
      const n = 1 + Math.floor(rand() * 6);
      const workers = Array.from({ length: n }, (_, i) => w(`w${i}`, 0.5 + rand() * 200, rand() < 0.3 ? undefined : 1e5 + rand() * 1e9));
      const batchSize = 1 + Math.floor(rand() * 500);
      const a = allocate({ batchSize, workers, stepBytesPerWorker: rand() * 1e7 });
      expect(sum(a.shares)).toBe(batchSize);
      a.shares.forEach((x) => expect(Number.isInteger(x) && x >= 0).toBe(true));
      expect(a.excluded.length).toBeLessThan(n);
      for (const e of a.excluded) expect(a.shares[e.index]).toBe(0);
      expect(a.shares.filter((x) => x > 0)).toHaveLength(n - a.excluded.length);
    }
  });
});
