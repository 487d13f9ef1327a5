/**
 * `nimble report`: one self-contained HTML file for a run directory. Styles are inline and
 * charts are SVG drawn here, so the file opens anywhere, offline, and loads nothing.
 */
import type { TrainSummary } from "../job/coordinator/index.js";
import type { StepMetrics } from "../job/runDir.js";
import type { DilocoFigures } from "../job/events.js";
import { type RunData, type RunFigures, runFigures } from "../runs/runData.js";
import { formatBytes, formatCount, formatDuration, formatMetric, formatRate, formatRatio } from "../ui/format.js";
import { type PipelineReport, pipelineReport, pipelineSection } from "./pipeline.js";
import { type ChartSpec, escapeXml, type Marker, movingAverage, niceTicks, PALETTE, type Point, renderChart, type Series, stack } from "./svg.js";

type Fault = TrainSummary["faults"][number];

/** A fault with its time resolved: older summaries lack wall_s, so it is taken from the step's metrics. */
export interface ReportFault extends Omit<Fault, "wall_s"> {
  wall_s: number | null;
}

export interface WorkerRow {
  rank: number;
  id: string | null;
  provider: string | null;
  device: string | null;
  samples: number;
  share: number;
}

/** Everything the HTML is drawn from; `nimble report --json` prints it. */
export interface ReportData {
  name: string;
  status: RunData["status"];
  error: string | null;
  dir: string;
  started_at: string;
  figures: RunFigures & {
    samples_per_s: number | null;
    uncompressed_bytes: number | null;
    compression_method: string | null;
    /** The strategy, and under diloco its rounds' figures. */
    strategy: string | null;
    diloco: { rounds: number; bytes_per_round: number; sync_s: number; hidden_fraction: number | null } | null;
    steps_redone: number[] | null;
    steps_skipped: number[];
    checkpoints: number[];
    eval_step: number | null;
  };
  workers: WorkerRow[];
  faults: ReportFault[];
  left_out: TrainSummary["left_out"];
  links: TrainSummary["links"];
  /** Under `parallel`: the plan, one step's timeline and the bubble (summary.json's, checked). */
  pipeline: PipelineReport | null;
  series: {
    loss: { step: number; wall_s: number; loss: number }[];
    eval: { step: number; wall_s: number; metrics: Record<string, number> }[];
    /** Per rank: samples / second of stepping (evaluation time taken out), smoothed over `window` steps. */
    throughput: { rank: number; label: string; window: number; points: { step: number; wall_s: number; samples_per_s: number }[] }[];
    /** Per rank: fraction of each step's global batch. */
    shares: { rank: number; label: string; points: { step: number; share: number }[] }[];
    bytes: { step: number; wall_s: number; bytes_sent: number; uncompressed_bytes: number }[];
    /** Under diloco, each round's figures (its metrics line's `step` is its last inner step). */
    rounds: ({ step: number; bytes_sent: number } & DilocoFigures)[];
  };
}

/** Ranks in the run: the summary's workers, else every rank metrics mention. */
function workerRows(run: RunData): WorkerRow[] {
  if (run.summary) {
    return [...run.summary.workers]
      .sort((a, b) => a.rank - b.rank)
      .map((w) => ({ rank: w.rank, id: w.id, provider: w.provider, device: w.device, samples: w.samples, share: w.share }));
  }
  const samples = new Map<number, number>();
  for (const m of run.metrics) for (const w of m.workers) samples.set(w.rank, (samples.get(w.rank) ?? 0) + w.samples);
  const total = [...samples.values()].reduce((a, b) => a + b, 0);
  return [...samples.entries()]
    .sort((a, b) => a[0] - b[0])
    .map(([rank, s]) => ({ rank, id: null, provider: null, device: null, samples: s, share: total > 0 ? s / total : 0 }));
}

function wallAtStep(metrics: StepMetrics[], step: number): number | null {
  // The step itself, else the first step after it (a fault's step is redone and so present,
  // but a run killed during recovery may end before it).
  return metrics.find((m) => m.step >= step)?.wall_s ?? metrics.at(-1)?.wall_s ?? null;
}

/** Smoothing for per-step rates: a step's time is noisy, a few steps' average is readable. */
function smoothingWindow(steps: number): number {
  return Math.max(1, Math.min(10, Math.round(steps / 20)));
}

export function reportData(run: RunData): ReportData {
  const s = run.summary;
  const figures = runFigures(run);
  const workers = workerRows(run);
  const label = (rank: number) => workers.find((w) => w.rank === rank)?.id ?? `rank ${rank}`;
  const metrics = run.metrics;

  const ranks = [...new Set([...workers.map((w) => w.rank), ...metrics.flatMap((m) => m.workers.map((w) => w.rank))])].sort((a, b) => a - b);
  const window = smoothingWindow(metrics.length);
  const throughput = ranks.map((rank) => {
    const raw: (Point & { wall_s: number })[] = [];
    for (const m of metrics) {
      const w = m.workers.find((v) => v.rank === rank);
      const stepping = m.step_s - (m.eval_s ?? 0);
      if (w && stepping > 0) raw.push({ x: m.step, y: w.samples / stepping, wall_s: m.wall_s });
    }
    const smooth = movingAverage(raw, window);
    return { rank, label: label(rank), window, points: smooth.map((p, i) => ({ step: p.x, wall_s: raw[i]!.wall_s, samples_per_s: p.y })) };
  });
  const shares = ranks.map((rank) => ({
    rank,
    label: label(rank),
    points: metrics.map((m) => {
      const total = m.workers.reduce((a, w) => a + w.samples, 0);
      const own = m.workers.find((w) => w.rank === rank)?.samples ?? 0;
      return { step: m.step, share: total > 0 ? own / total : 0 };
    }),
  }));

  const sent = metrics.reduce((a, m) => a + m.bytes_sent, 0);
  return {
    name: run.name,
    status: run.status,
    error: s?.error ?? null,
    dir: run.dir,
    started_at: run.startedAt.toISOString(),
    figures: {
      ...figures,
      uncompressed_bytes: s?.uncompressed_bytes ?? (sent > 0 ? metrics.reduce((a, m) => a + m.uncompressed_bytes, 0) : null),
      compression_method: s?.strategy?.name === "diloco" ? null : s?.compression ? describeCompression(s.compression) : null,
      strategy: s?.strategy ? describeStrategy(s.strategy) + describeParallel(s.pipeline?.config) : null,
      diloco: s?.diloco ?? null,
      steps_redone: s?.steps_redone ?? null,
      steps_skipped: s?.steps_skipped ?? metrics.filter((m) => m.skipped).map((m) => m.step),
      checkpoints: run.checkpoints,
      eval_step: s?.eval_step ?? [...metrics].reverse().find((m) => m.eval)?.step ?? null,
    },
    workers,
    faults: (s?.faults ?? []).map((f) => ({ ...f, wall_s: typeof f.wall_s === "number" ? f.wall_s : wallAtStep(metrics, f.step) })),
    left_out: s?.left_out ?? [],
    links: s?.links ?? [],
    pipeline: pipelineReport(s?.pipeline),
    series: {
      loss: metrics.filter((m) => typeof m.loss === "number" && Number.isFinite(m.loss)).map((m) => ({ step: m.step, wall_s: m.wall_s, loss: m.loss! })),
      eval: metrics.filter((m) => m.eval && Object.keys(m.eval).length > 0).map((m) => ({ step: m.step, wall_s: m.wall_s, metrics: m.eval! })),
      throughput,
      shares,
      bytes: metrics.map((m) => ({ step: m.step, wall_s: m.wall_s, bytes_sent: m.bytes_sent, uncompressed_bytes: m.uncompressed_bytes })),
      rounds: metrics.flatMap((m) => (m.diloco ? [{ step: m.step, bytes_sent: m.bytes_sent, ...m.diloco }] : [])),
    },
  };
}

function describeStrategy(st: { name: string; [k: string]: unknown }): string {
  if (st.name !== "diloco") return st.name;
  return `diloco: H=${st.inner_steps}, ${st.fragments} fragment(s), overlap ${st.overlap_steps}, alpha ${st.alpha}, codec ${st.codec}`;
}

/** ", pipeline: S stages, M micro-batches, 1f1b" under `parallel` (read from the file: checked). */
function describeParallel(p: unknown): string {
  if (typeof p !== "object" || p === null) return "";
  const { pipeline_stages: s, micro_batches: m, schedule, activation_codec: codec } = p as Record<string, unknown>;
  if (!Number.isInteger(s) || !Number.isInteger(m)) return "";
  const name = (v: unknown) => (typeof v === "string" && /^[a-z0-9]{1,16}$/.test(v) ? v : "?");
  return `, pipeline: ${s} stages, ${m} micro-batches, ${name(schedule)}, activations ${name(codec)}`;
}

function describeCompression(c: TrainSummary["compression"]): string {
  const fields = c as unknown as Record<string, unknown>;
  const method = String(fields.method ?? "none");
  if (method === "none") return "none";
  const details = Object.entries(fields)
    .filter(([k, v]) => k !== "method" && (typeof v === "number" || typeof v === "string"))
    .filter(([k]) => k === "rank" || k === "start_step" || k === "bits")
    .map(([k, v]) => `${k.replace(/_/g, " ")} ${v}`);
  return details.length ? `${method} (${details.join(", ")})` : method;
}

/** Seconds shown in the unit that keeps axis numbers short. */
function timeAxis(maxSeconds: number): { div: number; label: string } {
  if (maxSeconds >= 3 * 3600) return { div: 3600, label: "wall time (h)" };
  if (maxSeconds >= 180) return { div: 60, label: "wall time (min)" };
  return { div: 1, label: "wall time (s)" };
}

/** Faults and left-out workers as vertical markers, at their step or their time. */
function markers(data: ReportData, axis: "step" | "wall_s", div = 1): Marker[] {
  const out: Marker[] = [];
  data.faults.forEach((f, i) => {
    const at = axis === "step" ? f.step : f.wall_s === null ? NaN : f.wall_s / div;
    const recovery = f.recovery_s === null ? "" : `, recovered in ${f.recovery_s.toFixed(1)} s`;
    out.push({ x: at, label: `F${i + 1}`, kind: "fault-marker", title: `Fault ${i + 1} at step ${f.step}: ${f.kind} (ranks ${f.ranks.join(", ") || "none"}): ${f.reason}${recovery}` });
  });
  const wall = new Map(data.series.bytes.map((b) => [b.step, b.wall_s]));
  data.left_out.forEach((l, i) => {
    const at = axis === "step" ? l.after_step : (wall.get(l.after_step) ?? NaN) / div;
    out.push({ x: at, label: `L${i + 1}`, kind: "leftout-marker", title: `Worker ${l.id} (rank ${l.rank}) left out after step ${l.after_step}: ${l.reason}` });
  });
  return out;
}

const isLossMetric = (name: string) => /loss/i.test(name);

/** Training loss as a line, validation metrics as points: losses on the left axis, the rest (accuracy...) on the right. */
function lossCharts(data: ReportData): ChartSpec[] {
  const evalNames = [...new Set(data.series.eval.flatMap((e) => Object.keys(e.metrics)))];
  const time = timeAxis(data.series.bytes.reduce((a, b) => Math.max(a, b.wall_s), 0));
  const build = (axis: "step" | "wall_s"): ChartSpec => {
    const xOf = (p: { step: number; wall_s: number }) => (axis === "step" ? p.step : p.wall_s / time.div);
    const series: Series[] = [{ name: "training loss", kind: "line", color: PALETTE[0], points: data.series.loss.map((p) => ({ x: xOf(p), y: p.loss })) }];
    evalNames.forEach((name, i) => {
      series.push({
        name: `validation ${name}`,
        kind: "points",
        color: PALETTE[(i + 1) % PALETTE.length],
        axis: isLossMetric(name) ? "left" : "right",
        points: data.series.eval.filter((e) => name in e.metrics).map((e) => ({ x: xOf(e), y: e.metrics[name]! })),
      });
    });
    const rightNames = evalNames.filter((n) => !isLossMetric(n));
    return {
      id: axis === "step" ? "loss-by-step" : "loss-by-time",
      title: axis === "step" ? "Loss and validation metrics by step" : "Loss and validation metrics by wall time",
      xLabel: axis === "step" ? "step" : time.label,
      yLabel: "loss",
      ...(rightNames.length ? { y2Label: rightNames.join(", ") } : {}),
      xInteger: axis === "step",
      series,
      markers: markers(data, axis, time.div),
      formatY: formatMetricTick,
      formatY2: formatMetricTick,
    };
  };
  return [build("step"), build("wall_s")];
}

/** Byte ticks in one decimal unit for the whole axis, as few digits as the ticks need: "0 B", "20 MB", "2.5 MB". */
function byteTicks(max: number): (v: number) => string {
  const units: [number, string][] = [[1e12, "TB"], [1e9, "GB"], [1e6, "MB"], [1e3, "kB"], [1, "B"]];
  const [div, unit] = units.find(([d]) => max >= d) ?? [1, "B"];
  return (v) => (v === 0 ? "0 B" : `${Number((v / div).toPrecision(4))} ${unit}`);
}

function formatMetricTick(v: number): string {
  return Number(v.toPrecision(4)).toString();
}

function rankColor(rank: number): string {
  return Number.isInteger(rank) && rank >= 0 ? PALETTE[rank % PALETTE.length]! : "#888";
}

function charts(data: ReportData): ChartSpec[] {
  const window = data.series.throughput[0]?.window ?? 1;
  const throughput: ChartSpec = {
    id: "throughput",
    title: window > 1 ? `Samples/s per worker (moving average of ${window} steps)` : "Samples/s per worker",
    xLabel: "step",
    yLabel: "samples/s",
    xInteger: true,
    yFromZero: true,
    series: data.series.throughput.map((t) => ({ name: t.label, kind: "line", color: rankColor(t.rank), points: t.points.map((p) => ({ x: p.step, y: p.samples_per_s })) })),
    markers: markers(data, "step"),
    formatY: formatRate,
  };
  const shares: ChartSpec = {
    id: "shares",
    title: "Share of each step's batch",
    xLabel: "step",
    yLabel: "share of batch",
    xInteger: true,
    yDomain: [0, 1],
    series: stack(data.series.shares.map((s) => ({ name: s.label, color: rankColor(s.rank), points: s.points.map((p) => ({ x: p.step, y: p.share })) }))),
    markers: markers(data, "step"),
    formatY: (v) => `${Math.round(v * 100)}%`,
  };
  const bytes: ChartSpec = {
    id: "bytes",
    title: "Bytes on the wire per step",
    xLabel: "step",
    yLabel: "bytes",
    xInteger: true,
    series: [
      { name: "sent", kind: "bars", color: PALETTE[0], points: data.series.bytes.map((b) => ({ x: b.step, y: b.bytes_sent })) },
      { name: "uncompressed (float32 all-reduce)", kind: "line", dashed: true, color: "#555", points: data.series.bytes.map((b) => ({ x: b.step, y: b.uncompressed_bytes })) },
    ],
    markers: markers(data, "step"),
    formatY: byteTicks(niceTicks(0, data.series.bytes.reduce((a, b) => Math.max(a, b.bytes_sent, b.uncompressed_bytes), 0)).max),
  };
  return [...lossCharts(data), throughput, shares, bytes];
}

/** Cells stay on one line except in the columns named in `wrap` (free text such as reasons). */
function table(headers: string[], rows: string[][], cls = "", wrap: string[] = []): string {
  const wraps = headers.map((h) => wrap.includes(h));
  const head = headers.map((h) => `<th>${escapeXml(h)}</th>`).join("");
  const body = rows.map((r) => `<tr>${r.map((c, i) => `<td${wraps[i] ? ' class="wrap"' : ""}>${c}</td>`).join("")}</tr>`).join("\n");
  return `<table${cls ? ` class="${cls}"` : ""}><thead><tr>${head}</tr></thead><tbody>\n${body}\n</tbody></table>`;
}

const e = (v: string | number | null | undefined) => escapeXml(v === null || v === undefined || v === "" ? "—" : String(v));
const stepList = (steps: number[] | null) => (steps === null ? "—" : steps.length === 0 ? "none" : `${steps.length} (${steps.slice(0, 12).join(", ")}${steps.length > 12 ? ", …" : ""})`);

function summaryTable(d: ReportData): string {
  const f = d.figures;
  const evalText = f.eval && Object.keys(f.eval).length ? Object.entries(f.eval).map(([k, v]) => `${k} ${formatMetric(v)}`).join(", ") + (f.eval_step !== null ? ` (step ${f.eval_step})` : "") : null;
  const compression =
    f.compression_ratio !== null && Number.isFinite(f.compression_ratio) ? `${formatRatio(f.compression_ratio)}${f.compression_method ? `, ${f.compression_method}` : ""}` : f.compression_method;
  const rows: [string, string | number | null][] = [
    ["Name", d.name],
    ["Status", d.status + (d.error ? `: ${d.error}` : d.status === "incomplete" ? " (no summary.json: still running, or killed)" : "")],
    ["Steps", formatCount(f.steps)],
    ["Samples", formatCount(f.samples)],
    ["Wall time", f.wall_s === null ? null : `${formatDuration(f.wall_s)} (${f.wall_s.toFixed(1)} s)`],
    ["Samples/s (training)", f.samples_per_s === null ? null : formatRate(f.samples_per_s)],
    ["Final loss", f.final_loss === null ? null : formatMetric(f.final_loss)],
    ["Final validation", evalText],
    ["Bytes sent", `${formatBytes(f.bytes_sent)}${f.uncompressed_bytes ? ` (uncompressed ${formatBytes(f.uncompressed_bytes)})` : ""}`],
    ["Strategy", f.strategy],
    ["Compression", compression],
    ...(f.diloco
      ? ([
          [
            "DiLoCo rounds",
            `${formatCount(f.diloco.rounds)}, ${formatBytes(f.diloco.bytes_per_round)} per round; sync ${f.diloco.sync_s.toFixed(1)} s` +
              (f.diloco.hidden_fraction !== null ? `, ${Math.round(f.diloco.hidden_fraction * 100)}% of it hidden behind inner steps` : ""),
          ],
        ] as [string, string][])
      : []),
    ["Workers", f.workers],
    ["Faults", f.faults],
    ["Steps redone", stepList(f.steps_redone)],
    ["Steps skipped", stepList(f.steps_skipped)],
    ["Checkpoints", f.checkpoints.length ? `${f.checkpoints.length} (latest step ${f.checkpoints.at(-1)})` : "none"],
    ["Started at", d.started_at.replace("T", " ").replace(/\.\d+Z$/, " UTC")],
    ["Run directory", d.dir],
  ];
  const statusClass = `status-${d.status}`;
  return `<table class="summary" id="summary"><tbody>\n${rows
    .map(([k, v]) => `<tr><th scope="row">${escapeXml(k)}</th><td${k === "Status" ? ` class="${statusClass}"` : ""}>${e(v)}</td></tr>`)
    .join("\n")}\n</tbody></table>`;
}

function workersTable(d: ReportData): string {
  return table(
    ["Rank", "Worker", "Provider", "Device", "Samples", "Share"],
    d.workers.map((w) => [
      // summary.json is a file on disk: its rank may be anything, and is escaped like the rest.
      `<span class="swatch" style="background:${rankColor(w.rank)}"></span>${e(w.rank)}`,
      e(w.id),
      e(w.provider),
      e(w.device),
      e(formatCount(w.samples)),
      e(`${(w.share * 100).toFixed(1)}%`),
    ]),
    "workers",
  );
}

/** Under diloco: the rounds, the last 200 of them. */
function roundsSection(d: ReportData): string {
  const rounds = d.series.rounds.slice(-200);
  if (rounds.length === 0) return "";
  const hidden = (r: DilocoFigures) => (r.comm_s + r.hidden_s > 0 ? `${Math.round((100 * r.hidden_s) / (r.comm_s + r.hidden_s))}%` : "—");
  return `<h2>DiLoCo rounds</h2>\n${table(
    ["round", "inner steps to", "fragment", "outer lr", "sync", "hidden", "bytes sent"],
    rounds.map((r) => [String(r.round + 1), String(r.step + 1), String(r.fragment), formatMetric(r.outer_lr), `${(r.comm_s + r.hidden_s).toFixed(2)} s`, hidden(r), formatBytes(r.bytes_sent)]),
  )}`;
}

function faultsSection(d: ReportData): string {
  const parts: string[] = [];
  if (d.faults.length) {
    parts.push(`<h2>Faults</h2>`);
    parts.push(
      table(
        ["#", "Step", "Time", "Kind", "Ranks", "Reason", "Recovery"],
        d.faults.map((f, i) => [
          e(`F${i + 1}`),
          e(f.step),
          e(f.wall_s === null ? null : `${f.wall_s.toFixed(1)} s`),
          e(f.kind),
          e(f.ranks.join(", ") || "none"),
          e(f.reason),
          e(f.recovery_s === null ? null : `${f.recovery_s.toFixed(1)} s`),
        ]),
        "faults",
        ["Reason"],
      ),
    );
  }
  if (d.left_out.length) {
    parts.push(`<h2>Workers left out</h2>`);
    parts.push(table(["#", "Rank", "Worker", "After step", "Reason"], d.left_out.map((l, i) => [e(`L${i + 1}`), e(l.rank), e(l.id), e(l.after_step), e(l.reason)]), "left-out", ["Reason"]));
  }
  return parts.join("\n");
}

function linksTable(d: ReportData): string {
  const measured = d.links.filter((l) => l.upload_bytes_per_s !== null || l.rtt_ms !== null);
  if (!measured.length) return "";
  return `<h2>Links</h2>\n${table(
    ["From rank", "To rank", "Round trip", "Upload"],
    measured.map((l) => [e(l.rank), e(l.to), e(l.rtt_ms === null ? null : `${l.rtt_ms.toFixed(1)} ms`), e(l.upload_bytes_per_s === null ? null : `${formatBytes(l.upload_bytes_per_s)}/s`)]),
    "links",
  )}`;
}

const STYLE = `
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f5f6f8; color: #222; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 960px; margin: 0 auto; padding: 24px 20px 40px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 10px; }
.subtitle { color: #666; margin: 0 0 20px; }
table { border-collapse: collapse; background: #fff; width: 100%; border: 1px solid #e2e4e8; border-radius: 6px; overflow: hidden; }
th, td { text-align: left; padding: 6px 12px; border-bottom: 1px solid #eceef1; vertical-align: top; }
thead th { background: #f0f2f5; font-weight: 600; }
tbody tr:last-child th, tbody tr:last-child td { border-bottom: none; }
table.summary th { width: 180px; color: #555; font-weight: 500; }
table.summary td { font-variant-numeric: tabular-nums; word-break: break-all; }
table:not(.summary) th, table:not(.summary) td { font-variant-numeric: tabular-nums; white-space: nowrap; }
table:not(.summary) td.wrap { white-space: normal; width: 100%; }
.status-completed { color: #2e7d32; font-weight: 600; }
.status-failed { color: #c62828; font-weight: 600; }
.status-cancelled, .status-incomplete { color: #b26a00; font-weight: 600; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 8px; }
figure { margin: 0 0 18px; background: #fff; border: 1px solid #e2e4e8; border-radius: 6px; padding: 8px; }
svg.chart { display: block; max-width: 100%; height: auto; }
footer { color: #888; font-size: 12px; margin-top: 28px; }
`;

/** The whole report: summary, workers, faults, then the charts. */
export function buildReport(run: RunData, generatedAt: Date = new Date()): string {
  const d = reportData(run);
  const figures = charts(d)
    .map((c) => `<figure>${renderChart(c)}</figure>`)
    .join("\n");
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>${escapeXml(`${d.name} — nimble report`)}</title>
<style>${STYLE}</style>
</head>
<body>
<main>
<h1>${escapeXml(d.name)}</h1>
<p class="subtitle">Training run report · ${escapeXml(d.status)} · ${escapeXml(formatCount(d.figures.steps))} steps</p>
<h2>Summary</h2>
${summaryTable(d)}
<h2>Workers</h2>
${workersTable(d)}
${roundsSection(d)}
${pipelineSection(d.pipeline)}
${faultsSection(d)}
${linksTable(d)}
<h2>Charts</h2>
${figures}
<footer>Generated by nimble report on ${escapeXml(generatedAt.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC"))}.</footer>
</main>
</body>
</html>
`;
}
