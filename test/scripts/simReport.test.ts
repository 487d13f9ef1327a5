import { describe, expect, it } from "vitest";
// @ts-expect-error plain ES module without types (a benchmark helper)
import { ratioTable, simChartSvg, simMarkdown, summary } from "../../scripts/lib/simReport.mjs";

const cell = (n: number, bytes: number, ratio: number, extra: Record<string, unknown> = {}) => ({
  n,
  bytes,
  rtt_ms: 100,
  rate_bits: 1e9,
  simS: { ring: ratio * 2, direct: ratio, halving_doubling: ratio * 1.5, two_level: ratio * 1.2 },
  boundS: 1,
  best: "direct",
  ratio,
  modelChoice: ratio > 2 ? "two_level" : "direct",
  regret: ratio > 2 ? 1.2 : 1,
  groupSize: 2,
  miss: ratio > 2 ? "per-message CPU" : null,
  ratioWithoutSoftware: ratio > 2 ? 0.9 : null,
  ...extra,
});

const results = {
  generated: "2026-12-01T20:00:00.000Z",
  seconds: 12,
  settings: { n: [4, 1024], rtt_ms: [100], rate_bits: [1e9], bytes: [65536] },
  costs: { measured: { repeats: 3, cores: 2, load: 1.5, hop_s: 50e-6, op_fixed_s: 200e-6, ring_s_per_byte: 4e-9, transport_s_per_byte: 3e-9 } },
  cells: [cell(4, 65536, 1.2), cell(1024, 65536, 3.1)],
  validation: {
    skipped: null,
    rows: [
      { n: 2, rtt_ms: 10, rate_bits: 20e6, bytes: 65536, measured_s: 0.04, simulated_s: 0.03, error: -0.25, load: 2 },
      { n: 4, rtt_ms: 100, rate_bits: 200e6, bytes: 2097152, measured_s: 0.5, simulated_s: 0.55, error: 0.1, load: 2 },
    ],
  },
};

describe("bench:sim report", () => {
  it("counts the cells within 2x, the model's agreement, and groups the misses by reason", () => {
    const s = summary(results);
    expect([s.cells, s.met, s.metBare, s.agree]).toEqual([2, 1, 2, 1]);
    expect(Object.keys(s.byReason)).toEqual(["per-message CPU"]);
    expect(s.worst.n).toBe(1024);
    expect(s.regret.regret).toBe(1.2);
  });

  it("writes the best algorithm and ratio per cell, marking misses, and the validation with its error", () => {
    expect(ratioTable(results)).toContain("| 100 ms | 1 Gbit/s | 64 KiB | D 1.2 | D 3.1! |");
    const md = simMarkdown(results);
    expect(md).toContain("met in 1 of 2 cells");
    expect(md).toContain("**per-message CPU** (1 cells): N 1024");
    expect(md).toContain("| 2 | 10 ms | 20 Mbit/s | 64 KiB | 40.0 ms | 30.0 ms | -25% | 2.0 |");
    expect(md).toContain("Median absolute error 25%, largest 25%.");
    expect(simMarkdown({ ...results, validation: { skipped: "not running as root", rows: [] } })).toContain("Skipped: not running as root.");
  });

  it("draws one line per algorithm and the bound in each panel", () => {
    const svg = simChartSvg(results, [{ rtt_ms: 100, rate_bits: 1e9, bytes: 65536 }]);
    expect(svg.match(/<polyline/g)).toHaveLength(5);
    expect(svg).toContain("lower bound");
    expect(svg).toContain("64 KiB, RTT 100 ms, 1 Gbit/s");
  });
});
