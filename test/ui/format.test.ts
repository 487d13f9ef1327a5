import { describe, expect, it } from "vitest";
import {
  estimateEta,
  formatBytes,
  formatCount,
  formatDuration,
  formatMetric,
  formatMs,
  formatRate,
  formatSci,
  progressBar,
  sparkline,
} from "../../src/ui/format.js";

describe("format", () => {
  it("formats bytes in decimal units", () => {
    expect(formatBytes(0)).toBe("0 B");
    expect(formatBytes(999)).toBe("999 B");
    expect(formatBytes(4_100_000)).toBe("4.1 MB");
    expect(formatBytes(41_234_000)).toBe("41.2 MB");
    expect(formatBytes(412_000_000)).toBe("412 MB");
    expect(formatBytes(999_700)).toBe("1.0 MB");
    expect(formatBytes(1_250_000_000)).toBe("1.3 GB");
    expect(formatBytes(NaN)).toBe("-");
  });

  it("formats durations", () => {
    expect(formatDuration(0.42)).toBe("0.4s");
    expect(formatDuration(12.4)).toBe("12s");
    expect(formatDuration(185)).toBe("3m05s");
    expect(formatDuration(3720)).toBe("1h02m");
    expect(formatDuration(2 * 86400 + 3 * 3600)).toBe("2d03h");
    expect(formatDuration(-1)).toBe("-");
  });

  it("formats metrics, rates, counts and learning rates", () => {
    expect(formatMetric(0.43124)).toBe("0.4312");
    expect(formatMetric(2)).toBe("2");
    expect(formatMetric(0.00002)).toBe("2.0e-5");
    expect(formatMetric(NaN)).toBe("nan");
    expect(formatMetric(Infinity)).toBe("inf");
    expect(formatSci(1.2e-3)).toBe("1.2e-3");
    expect(formatSci(0.01)).toBe("1.0e-2");
    expect(formatSci(0)).toBe("0");
    expect(formatSci(1500)).toBe("1.5e3");
    expect(formatRate(312.4)).toBe("312");
    expect(formatRate(45.67)).toBe("45.7");
    expect(formatRate(4.5)).toBe("4.5");
    expect(formatRate(0)).toBe("0");
    expect(formatRate(12_345)).toBe("12.3k");
    expect(formatRate(2_500_000)).toBe("2.5M");
    expect(formatCount(19200)).toBe("19,200");
    expect(formatMs(0.0123)).toBe("12 ms");
    expect(formatMs(0.0015)).toBe("1.5 ms");
  });

  it("estimates time left", () => {
    expect(estimateEta(40, 100, 300)).toBe(80);
    expect(estimateEta(0, 0, 300)).toBeUndefined();
  });

  it("draws a sparkline and a progress bar", () => {
    expect(sparkline([1, 2, 3, 4, 5, 6, 7, 8])).toBe("▁▂▃▄▅▆▇█");
    expect(sparkline([8, 1])).toBe("█▁");
    expect(sparkline([2, 2, 2])).toBe("▄▄▄");
    expect(sparkline([1, NaN, 2])).toBe("▁ █");
    expect(sparkline(Array.from({ length: 100 }, (_, i) => i)).length).toBe(40);
    expect(progressBar(0.5, 10)).toBe("█████░░░░░");
    expect(progressBar(2, 4)).toBe("████");
  });
});
