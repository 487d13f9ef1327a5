import { describe, expect, it } from "vitest";
import {
  allReduceLowerBoundS,
  CHUNK_BYTES,
  chooseAllReduce,
  type LinkCosts,
  predictAllReduceS,
  predictTwoLevelS,
  twoLevelGroupSize,
} from "../../src/collective/costModel.js";

const MiB = 1024 * 1024;
// RTT 100 ms, 100 Mbit/s.
const wan: LinkCosts = { alphaS: 0.05, betaSPerByte: 8 / 100e6 };

describe("allReduceLowerBoundS", () => {
  it("is alpha*ceil(log2 n) + 2(n-1)/n * bytes * beta", () => {
    expect(allReduceLowerBoundS(16, 64 * MiB, wan)).toBeCloseTo(0.05 * 4 + (30 / 16) * 64 * MiB * (8 / 100e6), 12);
    expect(allReduceLowerBoundS(5, 0, wan)).toBeCloseTo(0.05 * 3, 12);
    expect(allReduceLowerBoundS(1, MiB, wan)).toBe(0);
  });
});

describe("predictAllReduceS", () => {
  it("latency terms of a tiny buffer: ring 2(n-1), direct 2, halving-doubling 2 log2 n (+2 off powers of two)", () => {
    const alphaOnly: LinkCosts = { alphaS: 0.01, betaSPerByte: 0 };
    expect(predictAllReduceS("ring", 16, 4, alphaOnly)).toBeCloseTo(30 * 0.01, 12);
    expect(predictAllReduceS("direct", 16, 4, alphaOnly)).toBeCloseTo(2 * 0.01, 12);
    expect(predictAllReduceS("halving_doubling", 16, 4, alphaOnly)).toBeCloseTo(8 * 0.01, 12);
    expect(predictAllReduceS("halving_doubling", 12, 4, alphaOnly)).toBeCloseTo((6 + 2) * 0.01, 12);
  });

  it("a large buffer costs about the bandwidth term for ring, direct and halving-doubling on powers of two", () => {
    const bound = allReduceLowerBoundS(8, 256 * MiB, wan);
    const bandwidth = (2 * 7 * 256 * MiB * wan.betaSPerByte) / 8;
    for (const a of ["ring", "direct", "halving_doubling", "two_level"] as const) {
      const t = predictAllReduceS(a, 8, 256 * MiB, wan);
      // Pipelined chunks hide latency, so the sum-form bound is not strict; bandwidth is.
      expect(t).toBeGreaterThan(bandwidth);
      expect(t / bound).toBeLessThan(1.1);
    }
  });

  it("the ring hides its latency behind a segment of many chunks, not behind one chunk", () => {
    const ideal = (2 * 3 * 64 * MiB * wan.betaSPerByte) / 4;
    // 64 MiB among 4: 16 MiB segments of 64 chunks, each transmitted far longer than alpha.
    expect(predictAllReduceS("ring", 4, 64 * MiB, wan) - ideal).toBeLessThan(2 * wan.alphaS);
    // 64 KiB among 4: every phase pays alpha.
    const small = predictAllReduceS("ring", 4, 64 * 1024, wan);
    expect(small).toBeGreaterThan(6 * wan.alphaS);
  });

  it("a per-message software cost weighs on direct at large n: n-1 messages per phase", () => {
    const hop: LinkCosts = { alphaS: 0.005, betaSPerByte: 8 / 10e9, hopS: 100e-6 };
    const direct = predictAllReduceS("direct", 1024, 1024, hop);
    expect(direct).toBeCloseTo(2 * (0.005 + 100e-6 + 1023 * 100e-6), 9);
    expect(predictAllReduceS("halving_doubling", 1024, 1024, hop)).toBeLessThan(direct);
  });

  it("is 0 for a single member and refuses bad input", () => {
    expect(predictAllReduceS("ring", 1, MiB, wan)).toBe(0);
    expect(() => predictAllReduceS("ring", 0, MiB, wan)).toThrow(RangeError);
    expect(() => predictAllReduceS("ring", 2.5, MiB, wan)).toThrow(RangeError);
    expect(() => predictAllReduceS("ring", 4, -1, wan)).toThrow(RangeError);
    expect(() => predictAllReduceS("ring", 4, MiB, { alphaS: Number.NaN, betaSPerByte: 0 })).toThrow(/alphaS/);
    expect(() => predictAllReduceS("ring", 4, MiB, { alphaS: 0, betaSPerByte: 0, hopS: -1 })).toThrow(/hopS/);
    expect(() => predictAllReduceS("bogus" as never, 4, MiB, wan)).toThrow(/unknown/);
  });
});

describe("two_level", () => {
  it("groups of n are the ring, groups of 1 are direct", () => {
    for (const bytes of [1024, 3 * MiB, 100 * MiB]) {
      expect(predictTwoLevelS(12, bytes, wan, 12)).toBeCloseTo(predictAllReduceS("ring", 12, bytes, wan), 12);
      expect(predictTwoLevelS(12, bytes, wan, 1)).toBeCloseTo(predictAllReduceS("direct", 12, bytes, wan), 12);
    }
    expect(() => predictTwoLevelS(12, 1024, wan, 5)).toThrow(/divide/);
  });

  it("picks an inner group size that cuts the per-message cost of direct at large n", () => {
    const hop: LinkCosts = { alphaS: 0.005, betaSPerByte: 8 / 1e9, hopS: 200e-6 };
    const g = twoLevelGroupSize(1024, 4096, hop);
    expect(g).toBeGreaterThan(1);
    expect(g).toBeLessThan(1024);
    expect(predictAllReduceS("two_level", 1024, 4096, hop)).toBeLessThan(predictAllReduceS("direct", 1024, 4096, hop));
  });

  it("a fast intra-group link makes it cheaper than one flat group", () => {
    const lan: LinkCosts = { alphaS: 0.0002, betaSPerByte: 8 / 10e9 };
    expect(predictTwoLevelS(16, 64 * MiB, wan, 4, lan)).toBeLessThan(predictAllReduceS("ring", 16, 64 * MiB, wan) / 2);
  });
});

describe("chooseAllReduce", () => {
  it("picks direct for small buffers at high latency, and reports every prediction", () => {
    const choice = chooseAllReduce(16, 4096, wan, ["ring", "direct"]);
    expect(choice.algorithm).toBe("direct");
    expect(Object.keys(choice.predictedS)).toEqual(["ring", "direct"]);
    expect(choice.predictedS.ring).toBeGreaterThan(choice.predictedS.direct);
  });

  it("picks the ring when direct's per-message costs outweigh its latency saving", () => {
    const lan: LinkCosts = { alphaS: 20e-6, betaSPerByte: 1 / 1e9, hopS: 100e-6 };
    expect(chooseAllReduce(64, 64 * MiB, lan, ["ring", "direct"]).algorithm).toBe("ring");
  });

  it("ties go to the earlier in the list", () => {
    // A single chunk-sized segment among 2 members: ring and direct send the same one message.
    const link: LinkCosts = { alphaS: 0.01, betaSPerByte: 1e-8 };
    const bytes = 2 * CHUNK_BYTES;
    expect(predictAllReduceS("ring", 2, bytes, link)).toBeCloseTo(predictAllReduceS("direct", 2, bytes, link), 12);
    expect(chooseAllReduce(2, bytes, link, ["ring", "direct"]).algorithm).toBe("ring");
    expect(chooseAllReduce(2, bytes, link, ["direct", "ring"]).algorithm).toBe("direct");
    expect(() => chooseAllReduce(2, bytes, link, [])).toThrow(RangeError);
  });
});
