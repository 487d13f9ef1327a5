/** `nimble runs` and `nimble runs show` as text and as JSON (collected in runData.ts). */
import path from "node:path";
import { alignColumns, formatBytes, formatCount, formatDuration, formatMetric, formatRate, formatRatio } from "../ui/format.js";
import { formatMetrics } from "../ui/plain.js";
import { runFigures, type RunData, type RunFigures } from "./runData.js";

/** A run as `--json` prints it: where it is, how it ended, its key figures. */
export interface RunListing {
  run: string;
  dir: string;
  name: string;
  status: RunData["status"];
  started_at: string;
  updated_at: string;
  figures: RunFigures;
  checkpoints: number[];
}

export function runListing(run: RunData): RunListing {
  return {
    run: path.basename(run.dir),
    dir: run.dir,
    name: run.name,
    status: run.status,
    started_at: run.startedAt.toISOString(),
    updated_at: run.updatedAt.toISOString(),
    figures: runFigures(run),
    checkpoints: run.checkpoints,
  };
}

function localTime(d: Date): string {
  const p = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
}

/** The first validation metric that is not the loss (accuracy, perplexity...), else the loss. */
function headlineEval(evalMetrics: Record<string, number> | null): string {
  if (!evalMetrics) return "-";
  const entries = Object.entries(evalMetrics).filter(([, v]) => typeof v === "number");
  const pick = entries.find(([k]) => k !== "loss") ?? entries[0];
  return pick ? `${pick[0]} ${formatMetric(pick[1])}` : "-";
}

function table(header: string[], rows: string[][], right: Set<number>): string[] {
  return alignColumns(header, rows, right).map((cells) => cells.join("  ").trimEnd());
}

/** One line per run, oldest first, under a header. */
export function formatRunList(runs: RunData[], outputRoot: string): string[] {
  if (runs.length === 0) return [`No runs in ${outputRoot}. \`nimble train CONFIG\` writes them there (config field \`output\`).`];
  const rows = runs.map((r) => {
    const f = runFigures(r);
    return [
      path.basename(r.dir),
      r.status,
      localTime(r.startedAt),
      formatCount(f.steps),
      f.wall_s !== null ? formatDuration(f.wall_s) : "-",
      f.final_loss !== null ? formatMetric(f.final_loss) : "-",
      headlineEval(f.eval),
      f.samples_per_s !== null ? formatRate(f.samples_per_s) : "-",
      formatBytes(f.bytes_sent),
      String(f.workers),
      String(f.faults),
    ];
  });
  const header = ["run", "status", "started", "steps", "time", "loss", "eval", "samples/s", "sent", "workers", "faults"];
  return [...table(header, rows, new Set([3, 4, 5, 7, 8, 9, 10])), "", `${runs.length} run${runs.length === 1 ? "" : "s"} in ${outputRoot}; \`nimble runs show RUN\` for one, \`nimble report RUN\` for charts.`];
}

/** `nimble runs show RUN`: everything a user asks first about one run. */
export function formatRunDetail(run: RunData): string[] {
  const f = runFigures(run);
  const s = run.summary;
  const field = (label: string, value: string) => `  ${label.padEnd(12)}${value}`;
  const lines = [`${path.basename(run.dir)}  ${run.status}${s?.error ? `: ${s.error}` : ""}`];
  lines.push(field("job", run.name));
  lines.push(field("dir", run.dir));
  lines.push(field("started", `${localTime(run.startedAt)}${f.wall_s !== null ? `, ran ${formatDuration(f.wall_s)}` : ""}`));
  lines.push(field("steps", `${formatCount(f.steps)}${s && s.steps_redone.length ? ` (${s.steps_redone.length} redone after faults)` : ""}${s && s.steps_skipped.length ? `, ${s.steps_skipped.length} skipped (non-finite)` : ""}`));
  lines.push(field("samples", `${formatCount(f.samples)}${f.samples_per_s !== null ? ` (${formatRate(f.samples_per_s)} samples/s while training)` : ""}`));
  if (f.final_loss !== null) lines.push(field("final loss", formatMetric(f.final_loss)));
  if (f.eval) lines.push(field(`eval${s?.eval_step != null ? ` @ ${s.eval_step + 1}` : ""}`, formatMetrics(f.eval)));
  const method = s?.compression ? ` ${s.compression.method}${"rank" in s.compression && s.compression.method === "powersgd" ? ` rank ${String(s.compression.rank)}` : ""}` : "";
  lines.push(field("sent", `${formatBytes(f.bytes_sent)}${f.compression_ratio !== null ? ` (${formatRatio(f.compression_ratio)} compression${method ? `,${method}` : ""})` : ""}`));
  lines.push(field("checkpoints", run.checkpoints.length ? run.checkpoints.map((c) => `step ${c}`).join(", ") : "none"));
  if (s && s.workers.length > 0) {
    lines.push("", "  workers");
    const rows = s.workers.map((w) => [String(w.rank), w.id, w.device, formatCount(w.samples), `${(w.share * 100).toFixed(1)}%`]);
    lines.push(...table(["rank", "id", "device", "samples", "share"], rows, new Set([0, 3, 4])).map((l) => `    ${l}`));
  }
  if (s && s.left_out.length > 0) {
    lines.push("", "  left out");
    for (const l of s.left_out) lines.push(`    rank ${l.rank} (${l.id}) after step ${l.after_step}: ${l.reason}`);
  }
  if (s && s.faults.length > 0) {
    lines.push("", "  faults");
    for (const x of s.faults) {
      const recovered = x.recovery_s !== null ? `recovered in ${x.recovery_s.toFixed(1)} s` : "not recovered";
      lines.push(`    step ${x.step}: ${x.kind}${x.ranks.length ? ` (rank ${x.ranks.join(", ")})` : ""}, ${recovered}: ${x.reason}`);
    }
  }
  lines.push("", `  files       ${["config.yaml", "metrics.jsonl", ...(s ? ["summary.json"] : []), ...(run.logFile ? [path.basename(run.logFile)] : [])].join(", ")}`);
  lines.push(`  Charts: nimble report ${run.dir}`);
  return lines;
}
