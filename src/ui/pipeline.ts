/**
 * Pipeline parallelism's per-stage figures as text: one aligned row per stage worker for the
 * ink view, and one compact line per step for the plain log. Pure (no React, no I/O).
 */
import type { PipelineStageRow } from "../job/events.js";
import { formatBytes } from "./format.js";

/** Rows the live view shows at most; the rest are counted on one more line. */
export const MAX_PIPELINE_ROWS = 16;
/** Workers the plain line names at most. */
export const MAX_PIPELINE_LINE_ENTRIES = 16;

const finite = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);

/** Milliseconds, one decimal: `12.3`, `1234.5`; `-` when not a number. */
function ms(v: unknown): string {
  return finite(v) ? v.toFixed(1) : "-";
}

function int(v: unknown): string {
  return finite(v) ? String(Math.round(v)) : "?";
}

/** [lo, hi) as the inclusive range a user reads: `4-7`, `3` (one layer), `build_stages` (the task splits). */
export function formatLayers(layers: PipelineStageRow["layers"]): string {
  if (!Array.isArray(layers) || layers.length !== 2 || !finite(layers[0]) || !finite(layers[1])) return "build_stages";
  const [lo, hi] = layers;
  if (hi - lo <= 1) return String(lo);
  return `${lo}-${hi - 1}`;
}

/** By stage, then rank. */
export function sortStageRows(rows: readonly PipelineStageRow[]): PipelineStageRow[] {
  const key = (v: unknown) => (finite(v) ? v : Infinity);
  return [...rows].sort((a, b) => key(a.stage) - key(b.stage) || key(a.rank) - key(b.rank));
}

/** `chains 0,1` when the worker serves more than one chain (another replica of its stage was lost). */
function chainsCell(chains: unknown): string {
  return Array.isArray(chains) && chains.length > 1 ? `chains ${chains.map(int).join(",")}` : "";
}

/**
 * One row per stage worker, sorted by stage then rank, columns aligned:
 * `stage 1  rank 3  layers 4-7  chains 0,1  compute 12.3 ms  send 1.2  recv 3.4  bubble 5.6 ms  saved 1.2 MB  mem 310 MB`
 * (the chains column only when some worker serves more than one: it was rerouted to).
 * More than `max` rows: the first `max`, then `… N more stage workers`.
 */
export function formatPipelineRows(rows: readonly PipelineStageRow[], max = MAX_PIPELINE_ROWS): string[] {
  if (!Array.isArray(rows) || rows.length === 0) return [];
  const sorted = sortStageRows(rows);
  const shown = sorted.slice(0, Math.max(1, max));
  // Chains go before the figures, where a narrow terminal does not cut them off; the column
  // is there only when some worker serves more than one.
  const rerouted = shown.some((r) => chainsCell(r.chains) !== "");
  const cells = shown.map((r) => [
    `stage ${int(r.stage)}`,
    `rank ${int(r.rank)}`,
    `layers ${formatLayers(r.layers)}`,
    ...(rerouted ? [chainsCell(r.chains)] : []),
    `compute ${ms(r.compute_ms)} ms`,
    `send ${ms(r.send_ms)}`,
    `recv ${ms(r.recv_ms)}`,
    `bubble ${ms(r.bubble_ms)} ms`,
    `saved ${finite(r.peak_saved_bytes) ? formatBytes(r.peak_saved_bytes) : "-"}`,
    ...(shown.some((x) => finite(x.rss_bytes)) ? [`mem ${finite(r.rss_bytes) ? formatBytes(r.rss_bytes) : "-"}`] : []),
  ]);
  // Numbers right-aligned inside their column, labels left: "compute  2.0 ms" under "compute 12.3 ms".
  const widths = cells[0]!.map((_, i) => Math.max(...cells.map((c) => c[i]!.length)));
  const lines = cells.map((c) =>
    c
      .map((cell, i) => {
        const pad = " ".repeat(widths[i]! - cell.length);
        if (i === c.length - 1) return cell;
        const space = cell.indexOf(" ");
        return space < 0 ? cell + pad : cell.slice(0, space + 1) + pad + cell.slice(space + 1);
      })
      .join("  ")
      .trimEnd(),
  );
  if (sorted.length > shown.length) lines.push(`… ${sorted.length - shown.length} more stage workers`);
  return lines;
}

/**
 * The plain log's line: `pipeline: s0 r0 c12.3/s1.2/r3.4/b5.6 ms | s1 r1 c…` (compute / send /
 * receive / bubble ms of each stage worker, sorted by stage then rank); empty when there are none.
 */
export function formatPipelineLine(rows: readonly PipelineStageRow[], max = MAX_PIPELINE_LINE_ENTRIES): string {
  if (!Array.isArray(rows) || rows.length === 0) return "";
  const sorted = sortStageRows(rows);
  const shown = sorted.slice(0, Math.max(1, max));
  const parts = shown.map((r) => {
    const chains = Array.isArray(r.chains) && r.chains.length > 1 ? ` (chains ${r.chains.map(int).join(",")})` : "";
    return `s${int(r.stage)} r${int(r.rank)} c${ms(r.compute_ms)}/s${ms(r.send_ms)}/r${ms(r.recv_ms)}/b${ms(r.bubble_ms)} ms${chains}`;
  });
  if (sorted.length > shown.length) parts.push(`+${sorted.length - shown.length} more`);
  return `pipeline: ${parts.join(" | ")}`;
}
