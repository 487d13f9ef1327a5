import { describe, expect, it } from "vitest";
import { AUTO_ROUNDS, controlShare, mayOrderAhead, ordersAheadOn } from "../../../src/job/coordinator/ahead.js";

const base = { step: 5, steps: 100, evalEvery: 0, checkpointEvery: 0, leaveOutAfter: null, joinersWaiting: false, stopRequested: false };

describe("orders ahead: when the next round may be ordered", () => {
  it("orders ahead between plain rounds", () => {
    expect(mayOrderAhead(base)).toBe(true);
  });
  it("not past the last step", () => {
    expect(mayOrderAhead({ ...base, step: 99 })).toBe(false);
    expect(mayOrderAhead({ ...base, step: 98 })).toBe(true);
  });
  it("not across an evaluation, a checkpoint or leaving out slow workers (every worker must be decided there)", () => {
    expect(mayOrderAhead({ ...base, step: 9, evalEvery: 10 })).toBe(false);
    expect(mayOrderAhead({ ...base, step: 10, evalEvery: 10 })).toBe(true);
    expect(mayOrderAhead({ ...base, step: 19, checkpointEvery: 20 })).toBe(false);
    expect(mayOrderAhead({ ...base, step: 5, leaveOutAfter: 5 })).toBe(false);
  });
  it("not while joiners wait or a stop was asked for", () => {
    expect(mayOrderAhead({ ...base, joinersWaiting: true })).toBe(false);
    expect(mayOrderAhead({ ...base, stopRequested: true })).toBe(false);
  });
});

describe("orders ahead: auto", () => {
  const rounds = (wallS: number, busyS: number, n = AUTO_ROUNDS) => Array.from({ length: n }, () => ({ wallS, busyS }));
  it("measures the share of a round no worker was busy for", () => {
    expect(controlShare(rounds(0.2, 0.15))).toBeCloseTo(0.25);
    expect(controlShare([])).toBe(0);
  });
  it("turns on when the control round trip is above 5% of a step, after enough rounds", () => {
    expect(ordersAheadOn("auto", rounds(0.2, 0.1))).toBe(true);
    expect(ordersAheadOn("auto", rounds(0.2, 0.1, AUTO_ROUNDS - 1))).toBe(false);
    expect(ordersAheadOn("auto", rounds(1.0, 0.98))).toBe(false);
  });
  it("a noisy round does not decide alone: the median does", () => {
    expect(ordersAheadOn("auto", [{ wallS: 1, busyS: 0.99 }, { wallS: 5, busyS: 1 }, { wallS: 1, busyS: 0.99 }])).toBe(false);
  });
  it("on and off are as they say", () => {
    expect(ordersAheadOn("on", [])).toBe(true);
    expect(ordersAheadOn("off", rounds(1, 0))).toBe(false);
  });
});
