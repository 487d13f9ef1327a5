import { describe, expect, it } from "vitest";
import { parseRate, RateLimit } from "../../src/net/rateLimit.js";

describe("parseRate (--link-rate)", () => {
  it("reads bytes/s, decimal byte units and bit units", () => {
    expect(parseRate("1e6")).toBe(1e6);
    expect(parseRate("300kB")).toBe(300e3);
    expect(parseRate("12.5MB/s")).toBe(12.5e6);
    expect(parseRate("100Mbit")).toBe(12.5e6);
    expect(parseRate("1gbit")).toBe(125e6);
    expect(parseRate("20 Mbit/s")).toBe(2.5e6);
  });

  it("refuses what is not a positive rate, saying how to write one", () => {
    for (const bad of ["", "fast", "-5", "0", "10 parsecs"]) expect(() => parseRate(bad)).toThrow(/rate/);
  });
});

describe("RateLimit", () => {
  it("lets a burst through at once, then paces to the rate (never faster)", async () => {
    const limit = new RateLimit(1e6, 50e3);
    const t0 = performance.now();
    await limit.take(40e3); // within the burst
    expect(performance.now() - t0).toBeLessThan(50);
    for (let i = 0; i < 10; i++) await limit.take(50e3);
    // 540 kB at 1 MB/s with a 50 kB burst: at least 490 ms, whatever the machine.
    expect(performance.now() - t0).toBeGreaterThanOrEqual(480);
  });

  it("refuses a rate that is not positive", () => {
    expect(() => new RateLimit(0)).toThrow(/positive/);
    expect(() => new RateLimit(Number.NaN)).toThrow(/positive/);
  });
});
