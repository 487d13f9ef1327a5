/** Number, size and time formatting shared by the ink view and the plain log. */

/** Decimal (network) units: `0 B`, `512 B`, `4.1 kB`, `4.1 MB`, `1.25 GB`. */
export function formatBytes(bytes: number): string {
  if (!Number.isFinite(bytes)) return "-";
  const sign = bytes < 0 ? "-" : "";
  let v = Math.abs(bytes);
  if (v < 1000) return `${sign}${Math.round(v)} B`;
  const units = ["kB", "MB", "GB", "TB", "PB"];
  let i = -1;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i++;
  }
  // Rounding may carry into the next unit (999.7 kB -> "1000 kB"): step up instead.
  if (v >= 999.5 && i < units.length - 1) {
    v /= 1000;
    i++;
  }
  return `${sign}${v < 100 ? v.toFixed(1) : v.toFixed(0)} ${units[i]}`;
}

/** `0.4s`, `12s`, `3m05s`, `1h02m`, `2d03h`. */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "-";
  if (seconds < 10) return `${seconds.toFixed(1)}s`;
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${pad2(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${pad2(Math.floor((s % 3600) / 60))}m`;
  return `${Math.floor(s / 86400)}d${pad2(Math.floor((s % 86400) / 3600))}h`;
}

function pad2(n: number): string {
  return String(n).padStart(2, "0");
}

/** A loss or metric: 4 decimals in the usual range, scientific when tiny or huge. */
export function formatMetric(x: number): string {
  if (Number.isNaN(x)) return "nan";
  if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
  if (Number.isInteger(x) && Math.abs(x) < 1e6) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return formatSci(x);
  if (a >= 1000) return x.toFixed(1);
  return x.toFixed(4);
}

/** Compact scientific notation: `1.2e-3`, `3.0e-4`, `0`. */
export function formatSci(x: number, digits = 1): string {
  if (Number.isNaN(x)) return "nan";
  if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
  if (x === 0) return "0";
  return x.toExponential(digits).replace("e+", "e");
}

/** A rate or count: `312`, `4.5`, `12.3k`, `1.2M`. */
export function formatRate(x: number): string {
  if (!Number.isFinite(x)) return "-";
  const a = Math.abs(x);
  if (a >= 1e6) return `${(x / 1e6).toFixed(1)}M`;
  if (a >= 1e4) return `${(x / 1e3).toFixed(1)}k`;
  if (a >= 100) return x.toFixed(0);
  if (a >= 10) return x.toFixed(1);
  return x.toFixed(2).replace(/\.?0+$/, "") || "0";
}

/** Integer with thousands separators: `19,200`. */
export function formatCount(n: number): string {
  if (!Number.isFinite(n)) return "-";
  return Math.round(n).toLocaleString("en-US");
}

/** Milliseconds from seconds: `12 ms`, `1.5 ms`, `1,234 ms`. */
export function formatMs(seconds: number): string {
  if (!Number.isFinite(seconds)) return "-";
  const ms = seconds * 1000;
  if (ms < 10) return `${ms.toFixed(1)} ms`;
  return `${formatCount(ms)} ms`;
}

/** Seconds left, from elapsed wall time and progress; undefined when unknown. */
export function estimateEta(wallS: number, step: number, steps: number): number | undefined {
  if (!(step > 0) || !(steps > 0) || !(wallS > 0) || step > steps) return undefined;
  return (wallS / step) * (steps - step);
}

const BLOCKS = "▁▂▃▄▅▆▇█";

/** Unicode sparkline of the last `width` values (min..max scaled), NaN/inf drawn as a space. */
export function sparkline(values: readonly number[], width = 40): string {
  const vs = values.slice(-width);
  const finite = vs.filter((v) => Number.isFinite(v));
  if (finite.length === 0) return " ".repeat(vs.length);
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
  const span = hi - lo;
  return vs
    .map((v) => {
      if (!Number.isFinite(v)) return " ";
      const idx = span === 0 ? 3 : Math.round(((v - lo) / span) * (BLOCKS.length - 1));
      return BLOCKS[idx];
    })
    .join("");
}

/** `[██████░░░░]`-style bar body (no brackets) of exactly `width` cells. */
export function progressBar(fraction: number, width = 30): string {
  const f = Number.isFinite(fraction) ? Math.min(1, Math.max(0, fraction)) : 0;
  const full = Math.round(f * width);
  return "█".repeat(full) + "░".repeat(width - full);
}

/** A compression ratio: "31.2x", "1.0x". */
export function formatRatio(ratio: number): string {
  if (!Number.isFinite(ratio)) return "-";
  return `${ratio >= 100 ? ratio.toFixed(0) : ratio.toFixed(1)}x`;
}

/** Header and rows with every cell padded to its column's width, right-aligned where `right` says. */
export function alignColumns(header: readonly string[], rows: readonly (readonly string[])[], right: ReadonlySet<number>): string[][] {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const pad = (cells: readonly string[]) => header.map((_, i) => (right.has(i) ? (cells[i] ?? "").padStart(widths[i]!) : (cells[i] ?? "").padEnd(widths[i]!)));
  return [pad(header), ...rows.map(pad)];
}
