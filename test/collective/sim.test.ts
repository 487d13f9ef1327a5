import { describe, expect, it } from "vitest";
import { type AllReduceAlgorithm, predictAllReduceS } from "../../src/collective/costModel.js";
import { expectedBytesPerNode, expectedFrameBytesPerNode } from "../../src/collective/ring.js";
import { Schedule, type SimCosts, simulate } from "../../src/collective/simEngine.js";
import { allReduceSchedule, defaultGroupSize } from "../../src/collective/simSchedules.js";

const ZERO: SimCosts = { alphaS: 0, betaSPerByte: 0, sendMessageS: 0, recvMessageS: 0, sendSPerByte: 0, recvSPerByte: 0 };
const ALGORITHMS: AllReduceAlgorithm[] = ["ring", "direct", "halving_doubling", "two_level"];
const MiB = 1024 * 1024;

const run = (a: AllReduceAlgorithm, n: number, bytes: number, costs: Partial<SimCosts>, groupSize?: number) =>
  simulate(allReduceSchedule(a, n, bytes, { groupSize }), { ...ZERO, ...costs });

describe("simEngine", () => {
  it("a message costs send CPU, then the uplink, then alpha, then receive CPU", () => {
    const s = new Schedule(2);
    s.message(0, 1, 1000, 0);
    const r = simulate(s, { alphaS: 0.5, betaSPerByte: 1e-3, sendMessageS: 0.1, recvMessageS: 0.2, sendSPerByte: 1e-4, recvSPerByte: 2e-4 });
    expect(r.seconds).toBeCloseTo(0.1 + 0.1 + 1 + 0.5 + 0.2 + 0.2, 12);
    expect(r.maxBytesSent).toBe(1000);
  });

  it("a member's sends share its uplink and its receives share its CPU", () => {
    const s = new Schedule(3);
    s.message(0, 1, 100, 0);
    s.message(0, 2, 100, 0);
    expect(simulate(s, { ...ZERO, betaSPerByte: 0.01 }).seconds).toBeCloseTo(2, 12);
    const t = new Schedule(3);
    t.message(1, 0, 0, 0);
    t.message(2, 0, 0, 0);
    expect(simulate(t, { ...ZERO, recvMessageS: 1 }).seconds).toBeCloseTo(2, 12);
  });

  it("a gate releases its messages after all its signals", () => {
    const s = new Schedule(3);
    const g = s.gate(2, 0);
    s.message(1, 0, 0, 0, g);
    const slow = s.gate(1, 1);
    s.message(2, 1, 0, 0, slow);
    s.message(1, 0, 0, slow, g);
    s.message(0, 2, 0, g);
    expect(simulate(s, { ...ZERO, alphaS: 1 }).seconds).toBeCloseTo(3, 12);
  });

  it("reports a schedule whose gate can never open, and refuses bad input", () => {
    const s = new Schedule(2);
    s.message(0, 1, 0, s.gate(1, 0));
    expect(() => simulate(s, ZERO)).toThrow(/deadlocked/);
    // A member cannot be released by what another member received.
    expect(() => s.message(0, 1, 0, s.gate(1, 1))).toThrow(/not member 0's/);
    expect(() => simulate(new Schedule(2), { ...ZERO, alphaS: -1 })).toThrow(/alphaS/);
    expect(() => s.message(0, 0, 1, 0)).toThrow(RangeError);
    expect(() => s.message(0, 1, 1, 99)).toThrow(/gate/);
    expect(() => s.gate(0, 0)).toThrow(RangeError);
    expect(() => s.gate(1, 2)).toThrow(/no member/);
  });
});

describe("allReduceSchedule", () => {
  it("every algorithm completes for awkward n and lengths (shorter than n, not divisible by n)", () => {
    for (const a of ALGORITHMS) {
      for (const n of [2, 3, 5, 6, 7, 8, 12]) {
        for (const bytes of [0, 4, 12, 4 * 1001, 3 * MiB + 12]) {
          const r = run(a, n, bytes, { alphaS: 1e-3, betaSPerByte: 1e-9, recvMessageS: 1e-6 }, a === "two_level" ? defaultGroupSize(n) : undefined);
          expect(r.seconds, `${a} n=${n} bytes=${bytes}`).toBeGreaterThanOrEqual(0);
        }
      }
    }
  });

  it("the ring sends exactly what ring.ts sends, chunk headers included", () => {
    for (const [n, elements] of [
      [4, 3 * 65536 + 5],
      [5, 7],
    ]) {
      const r = run("ring", n, elements * 4, {});
      const payload = Math.max(...Array.from({ length: n }, (_, rank) => expectedBytesPerNode(elements, n, rank)));
      const frames = Math.max(...Array.from({ length: n }, (_, rank) => expectedFrameBytesPerNode(elements, n, rank)));
      expect(r.maxBytesSent).toBeGreaterThan(payload);
      expect(r.maxBytesSent).toBeLessThan(frames);
    }
  });

  it("latency terms: ring 2(n-1), direct 2, halving-doubling 2 log2 p (+2), two-level 2(g-1)+2", () => {
    const a = { alphaS: 1 };
    expect(run("ring", 8, 4096, a).seconds).toBeCloseTo(14, 9);
    expect(run("direct", 8, 4096, a).seconds).toBeCloseTo(2, 9);
    expect(run("halving_doubling", 8, 4096, a).seconds).toBeCloseTo(6, 9);
    expect(run("halving_doubling", 12, 4096, a).seconds).toBeCloseTo(8, 9);
    expect(run("two_level", 16, 4096, a, 4).seconds).toBeCloseTo(8, 9);
  });

  it("bandwidth: a large buffer costs 2(n-1)/n bytes through one uplink, for every algorithm on a power of two", () => {
    const beta = 1e-8;
    const ideal = (2 * 7 * 64 * MiB * beta) / 8;
    for (const a of ALGORITHMS) {
      const t = run(a, 8, 64 * MiB, { betaSPerByte: beta }, a === "two_level" ? 2 : undefined).seconds;
      expect(t, a).toBeGreaterThan(ideal);
      expect(t / ideal, a).toBeLessThan(1.05);
    }
    // Direct's n-1 concurrent slices share the sender's uplink: not n-1 times faster.
    expect(run("direct", 8, 8 * MiB, { betaSPerByte: beta }).seconds).toBeGreaterThan((2 * 7 * 8 * MiB * beta) / 8);
  });

  it("off powers of two, halving-doubling's fold costs two whole vectors more", () => {
    const beta = 1e-8;
    const t = run("halving_doubling", 6, 16 * MiB, { betaSPerByte: beta }).seconds;
    expect(t / (16 * MiB * beta)).toBeGreaterThan(2 + 1.5 - 0.01);
  });

  it("a receipt's sends go out from the same handler, before receives that arrived meanwhile", () => {
    const s = new Schedule(3);
    const a = s.gate(1, 1);
    s.message(0, 1, 0, 0, a);
    s.message(2, 1, 0, 0);
    s.message(1, 2, 0, a);
    // Member 1 gets two receipts at t=0 (1 s each); the one that releases its send is handled first.
    expect(simulate(s, { ...ZERO, recvMessageS: 1 }).seconds).toBeCloseTo(2, 12);
  });

  it("a per-message CPU cost serialises direct's n-1 receives at the owner", () => {
    const t = run("direct", 64, 64 * 4, { recvMessageS: 1e-3 }).seconds;
    expect(t).toBeGreaterThanOrEqual(2 * 63 * 1e-3);
    expect(run("ring", 64, 64 * 4, { recvMessageS: 1e-3 }).seconds).toBeCloseTo(126 * 1e-3, 9);
  });

  it("agrees with the cost model's closed forms within 15%", () => {
    const costs = { alphaS: 0.005, betaSPerByte: 8 / 1e9, sendMessageS: 20e-6, recvMessageS: 20e-6 };
    const link = { alphaS: 0.005, betaSPerByte: 8 / 1e9, hopS: 40e-6 };
    for (const a of ["ring", "direct", "halving_doubling"] as const) {
      for (const n of [4, 16, 24]) {
        for (const bytes of [4096, 4 * MiB, 64 * MiB]) {
          const sim = run(a, n, bytes, costs).seconds;
          const model = predictAllReduceS(a, n, bytes, link);
          expect(Math.abs(sim / model - 1), `${a} n=${n} bytes=${bytes}: sim ${sim} model ${model}`).toBeLessThan(0.15);
        }
      }
    }
  });

  it("refuses a group size that does not divide n, and bad chunk sizes", () => {
    expect(() => allReduceSchedule("two_level", 12, 1024, { groupSize: 5 })).toThrow(/divide/);
    expect(() => allReduceSchedule("ring", 4, 1024, { chunkBytes: 6 })).toThrow(/chunkBytes/);
    expect(() => allReduceSchedule("ring", 4, -4)).toThrow(/bytes/);
    expect(() => allReduceSchedule("bogus" as never, 4, 1024)).toThrow(/unknown/);
    expect(defaultGroupSize(1024)).toBe(32);
    expect(defaultGroupSize(12)).toBe(4);
  });
});
