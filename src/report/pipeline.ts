/**
 * The report's "Pipeline" section: the plan of the stages (layers, ranks, memory estimate
 * against the cap), why it was chosen, a timeline of one step (one lane per stage worker, a
 * rectangle per forward or backward micro-batch, the gaps between them the bubble), the
 * measured bubble per stage beside the theory, and the peak saved-activation bytes.
 *
 * summary.json is a file anyone may have edited and its `pipeline` is not validated on load:
 * `pipelineReport` reads it as unknown, keeps only well-formed values (finite numbers, bounded
 * texts and lists) and `pipelineSection` escapes every text it draws.
 */
import { formatBytes, formatCount, formatMs } from "../ui/format.js";
import { formatLayers } from "../ui/pipeline.js";
import { escapeXml, formatTick, niceTicks, PALETTE } from "./svg.js";

/** Rectangles drawn at most in the timeline (a bigger step is drawn in part, and says so). */
export const MAX_DRAWN_EVENTS = 20_000;
/** Events read at most for the bubble figures. */
export const MAX_READ_EVENTS = 1_000_000;
/** Workers read at most, and lanes drawn at most. */
export const MAX_WORKERS = 4096;
export const MAX_LANES = 128;
const MAX_STAGES = 4096;
const MAX_WHY = 100;
const MAX_TEXT = 500;
const MAX_NAME = 120;
const MAX_CHAINS = 64;

export const FORWARD_COLOR = PALETTE[0]!;
export const BACKWARD_COLOR = PALETTE[1]!;
const IDLE_COLOR = "#eceef1";
const FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";

export interface PipelinePlanStage {
  index: number;
  /** [lo, hi): the layers it holds. */
  layers: [number, number] | null;
  /** Its first and last layers' names. */
  names: [string, string] | null;
  ranks: number[];
  params: number | null;
  memory_bytes: number | null;
  cap_bytes: number | null;
  compute_s: number | null;
}

export interface PipelineEvent {
  kind: "F" | "B";
  chain: number;
  micro_batch: number;
  start_s: number;
  end_s: number;
}

export interface PipelineLane {
  rank: number;
  stage: number;
  /** The events drawn (sorted by start), at most MAX_DRAWN_EVENTS over all lanes. */
  events: PipelineEvent[];
  /** Events read for the figures (drawn or not). */
  event_count: number;
  /** Seconds it was running a forward or backward (overlaps counted once). */
  busy_s: number;
}

export interface PipelineReport {
  config: { pipeline_stages: number | null; micro_batches: number | null; schedule: string | null; activation_codec: string | null };
  /** True when the run resumed a checkpoint's layout (no fresh plan). */
  resumed: boolean;
  plan: {
    stages: PipelinePlanStage[];
    /** S + 1 layer indices (null: the task's build_stages split the model). */
    bounds: number[] | null;
    /** chains[d][s]: the rank holding stage s in replica d. */
    chains: number[][];
    objective: string | null;
    model: string | null;
    micro_batch: number | null;
    sequential: boolean | null;
  };
  why: string[];
  /** The last step's timeline; null when none was recorded. Times in seconds from its first event. */
  timeline: {
    step: number | null;
    start_s: number;
    end_s: number;
    lanes: PipelineLane[];
    /** Events read, drawn, and malformed ones left out; lanes left out of the drawing. */
    events: number;
    drawn: number;
    malformed: number;
    lanes_left_out: number;
  } | null;
  /** Per stage: 1 - busy / span, averaged over its workers (span: the step's first start to last end). */
  bubble: { stage: number; workers: number; measured: number | null }[];
  /** (S - 1) / (M + S - 1): the bubble of an ideal schedule. */
  theory_bubble: number | null;
  peak_saved_bytes: { stage: number; bytes: number }[];
}

type Obj = Record<string, unknown>;

const isObj = (v: unknown): v is Obj => typeof v === "object" && v !== null && !Array.isArray(v);
const finite = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v);
const nonNegInt = (v: unknown): v is number => finite(v) && Number.isInteger(v) && v >= 0 && v <= Number.MAX_SAFE_INTEGER;
const num = (v: unknown): number | null => (finite(v) ? v : null);
const count = (v: unknown): number | null => (nonNegInt(v) ? v : null);
const text = (v: unknown, max = MAX_TEXT): string | null => (typeof v === "string" ? (v.length > max ? `${v.slice(0, max)}…` : v) : null);
const ints = (v: unknown, max: number): number[] => (Array.isArray(v) ? v.slice(0, max).filter(nonNegInt) : []);

function planStage(v: unknown): PipelinePlanStage | null {
  if (!isObj(v) || !nonNegInt(v.index)) return null;
  const layers = Array.isArray(v.layers) && v.layers.length === 2 && nonNegInt(v.layers[0]) && nonNegInt(v.layers[1]) ? ([v.layers[0], v.layers[1]] as [number, number]) : null;
  const names =
    Array.isArray(v.names) && v.names.length === 2 && typeof v.names[0] === "string" && typeof v.names[1] === "string"
      ? ([text(v.names[0], MAX_NAME)!, text(v.names[1], MAX_NAME)!] as [string, string])
      : null;
  return {
    index: v.index,
    layers,
    names,
    ranks: ints(v.ranks, MAX_WORKERS),
    params: count(v.params),
    memory_bytes: num(v.memoryBytes),
    cap_bytes: num(v.capBytes),
    compute_s: num(v.computeS),
  };
}

/** Length of the union of [start, end) intervals (a worker's overlapping events counted once). */
function unionLength(events: { start_s: number; end_s: number }[]): number {
  const sorted = [...events].sort((a, b) => a.start_s - b.start_s);
  let total = 0;
  let lo = -Infinity;
  let hi = -Infinity;
  for (const e of sorted) {
    if (e.start_s > hi) {
      if (hi > lo) total += hi - lo;
      [lo, hi] = [e.start_s, e.end_s];
    } else if (e.end_s > hi) hi = e.end_s;
  }
  if (hi > lo) total += hi - lo;
  return total;
}

function readTimeline(v: unknown): { timeline: PipelineReport["timeline"]; all: { rank: number; stage: number; busy: number; n: number }[] } {
  if (!isObj(v) || !Array.isArray(v.workers)) return { timeline: null, all: [] };
  let budget = MAX_READ_EVENTS;
  let malformed = 0;
  const workers: { rank: number; stage: number; events: PipelineEvent[] }[] = [];
  for (const w of v.workers.slice(0, MAX_WORKERS)) {
    if (!isObj(w) || !nonNegInt(w.rank) || !nonNegInt(w.stage)) {
      malformed += 1;
      continue;
    }
    const events: PipelineEvent[] = [];
    if (Array.isArray(w.events)) {
      for (const e of w.events) {
        if (budget <= 0) break;
        budget -= 1;
        if (!Array.isArray(e) || (e[0] !== "F" && e[0] !== "B") || !nonNegInt(e[1]) || !nonNegInt(e[2]) || !finite(e[3]) || !finite(e[4]) || e[4] < e[3]) {
          malformed += 1;
          continue;
        }
        events.push({ kind: e[0], chain: e[1], micro_batch: e[2], start_s: e[3], end_s: e[4] });
      }
    }
    events.sort((a, b) => a.start_s - b.start_s || a.end_s - b.end_s);
    workers.push({ rank: w.rank, stage: w.stage, events });
  }
  let start = Infinity;
  let end = -Infinity;
  for (const w of workers) for (const e of w.events) [start, end] = [Math.min(start, e.start_s), Math.max(end, e.end_s)];
  const all = workers.map((w) => ({ rank: w.rank, stage: w.stage, busy: unionLength(w.events), n: w.events.length }));
  const total = all.reduce((a, w) => a + w.n, 0);
  if (workers.length === 0 || !(end >= start)) return { timeline: null, all: total > 0 ? all : [] };
  const order = workers.map((w, i) => ({ w, i })).sort((a, b) => a.w.stage - b.w.stage || a.w.rank - b.w.rank);
  const drawnWorkers = order.slice(0, MAX_LANES);
  const perLane = Math.max(1, Math.floor(MAX_DRAWN_EVENTS / drawnWorkers.length));
  const lanes: PipelineLane[] = drawnWorkers.map(({ w, i }) => ({ rank: w.rank, stage: w.stage, events: w.events.slice(0, perLane), event_count: w.events.length, busy_s: all[i]!.busy }));
  return {
    timeline: {
      step: count(v.step),
      start_s: start,
      end_s: end,
      lanes,
      events: total,
      drawn: lanes.reduce((a, l) => a + l.events.length, 0),
      malformed,
      lanes_left_out: workers.length - lanes.length,
    },
    all,
  };
}

/** The section's data from summary.json's `pipeline` (anything: a malformed one gives what can be read, or null). */
export function pipelineReport(raw: unknown): PipelineReport | null {
  if (!isObj(raw)) return null;
  const config = isObj(raw.config) ? raw.config : {};
  const plan = isObj(raw.plan) ? raw.plan : {};
  const stages = (Array.isArray(plan.stages) ? plan.stages.slice(0, MAX_STAGES) : []).map(planStage).filter((s): s is PipelinePlanStage => s !== null);
  const chains = Array.isArray(plan.chains) ? plan.chains.slice(0, MAX_CHAINS).map((c) => ints(c, MAX_STAGES)) : [];
  const why = (Array.isArray(raw.why) ? raw.why : []).slice(0, MAX_WHY).map((w) => text(w)).filter((w): w is string => w !== null);
  const { timeline, all } = readTimeline(raw.timeline);

  const S = count(config.pipeline_stages);
  const M = count(config.micro_batches);
  const theory = S !== null && M !== null && S > 0 && M > 0 ? (S - 1) / (M + S - 1) : null;

  const span = timeline ? timeline.end_s - timeline.start_s : 0;
  const byStage = new Map<number, number[]>();
  for (const w of all) {
    if (!byStage.has(w.stage)) byStage.set(w.stage, []);
    if (span > 0) byStage.get(w.stage)!.push(Math.min(1, Math.max(0, 1 - w.busy / span)));
  }
  const bubble = [...byStage.entries()]
    .sort((a, b) => a[0] - b[0])
    .map(([stage, fractions]) => ({
      stage,
      workers: all.filter((w) => w.stage === stage).length,
      measured: fractions.length ? fractions.reduce((a, f) => a + f, 0) / fractions.length : null,
    }));

  const peak = (Array.isArray(raw.peak_saved_bytes) ? raw.peak_saved_bytes.slice(0, MAX_STAGES) : []).flatMap((b, stage) => (finite(b) && b >= 0 ? [{ stage, bytes: b }] : []));

  return {
    config: {
      pipeline_stages: S,
      micro_batches: M,
      schedule: text(config.schedule, MAX_NAME),
      activation_codec: text(config.activation_codec, MAX_NAME),
    },
    resumed: plan.resumed === true,
    plan: {
      stages,
      bounds: Array.isArray(plan.bounds) ? ints(plan.bounds, MAX_STAGES + 1) : null,
      chains,
      objective: text(plan.objective, MAX_NAME),
      model: text(plan.model, MAX_NAME),
      micro_batch: count(plan.micro_batch),
      sequential: typeof plan.sequential === "boolean" ? plan.sequential : null,
    },
    why,
    timeline,
    bubble,
    theory_bubble: theory,
    peak_saved_bytes: peak,
  };
}

/** A coordinator for an attribute: two decimals, never NaN. */
function n(v: number): string {
  return Number.isFinite(v) ? String(Math.round(v * 100) / 100) : "0";
}

/** Rough width of a label at `px` (as svg.ts lays out its legends). */
function textWidth(s: string, px = 12): number {
  return s.length * px * 0.55;
}

const laneLabel = (l: PipelineLane) => `stage ${l.stage} · rank ${l.rank}`;

/** The timeline of one step as an `<svg>`: a lane per worker, a rectangle per forward / backward. */
export function renderTimeline(t: NonNullable<PipelineReport["timeline"]>, width = 900): string {
  const span = t.end_s - t.start_s;
  // Short steps read in milliseconds.
  const ms = span < 2;
  const unit = ms ? 1000 : 1;
  const title = `Timeline of step ${t.step ?? "?"}: forward and backward micro-batches per worker (the gaps are the bubble)`;
  const laneH = 20;
  const laneGap = 6;
  const labelW = Math.max(90, ...t.lanes.map((l) => textWidth(laneLabel(l)))) + 20;
  const plot = { x0: labelW, x1: width - 24, y0: 66 };
  const height = plot.y0 + t.lanes.length * (laneH + laneGap) + 46;
  const ticks = niceTicks(0, span * unit, Math.max(2, Math.floor((plot.x1 - plot.x0) / 90)));
  const x = (s: number) => plot.x0 + (((s - t.start_s) * unit - ticks.min) / (ticks.max - ticks.min || 1)) * (plot.x1 - plot.x0);
  const tickX = (v: number) => plot.x0 + ((v - ticks.min) / (ticks.max - ticks.min || 1)) * (plot.x1 - plot.x0);
  const yBottom = plot.y0 + t.lanes.length * (laneH + laneGap);

  const out: string[] = [];
  out.push(
    `<svg data-chart="pipeline-timeline" class="chart" width="${width}" height="${n(height)}" viewBox="0 0 ${width} ${n(height)}" role="img" aria-label="${escapeXml(title)}" font-family="${escapeXml(FONT)}" font-size="12">`,
  );
  out.push(`<title>${escapeXml(title)}</title>`);
  out.push(`<rect width="${width}" height="${n(height)}" fill="#fff"/>`);
  out.push(`<text x="${n(plot.x0)}" y="22" font-size="15" font-weight="600" fill="#222">${escapeXml(`Timeline of step ${t.step ?? "?"}`)}</text>`);
  // Legend.
  let lx = plot.x0;
  for (const [label, color] of [
    ["forward", FORWARD_COLOR],
    ["backward", BACKWARD_COLOR],
    ["idle (bubble)", IDLE_COLOR],
  ] as const) {
    out.push(`<g class="legend-item"><rect x="${n(lx)}" y="30" width="18" height="12" rx="2" fill="${color}"${color === IDLE_COLOR ? ' stroke="#ccc"' : ""}/><text x="${n(lx + 24)}" y="40" fill="#333">${escapeXml(label)}</text></g>`);
    lx += 26 + textWidth(label) + 16;
  }
  // Grid.
  out.push(`<g class="grid" stroke="#e6e6e6" stroke-width="1">`);
  for (const v of ticks.values) out.push(`<line x1="${n(tickX(v))}" x2="${n(tickX(v))}" y1="${n(plot.y0 - 4)}" y2="${n(yBottom)}"/>`);
  out.push(`</g>`);
  // Lanes.
  t.lanes.forEach((lane, i) => {
    const y = plot.y0 + i * (laneH + laneGap);
    out.push(`<g class="lane" data-stage="${lane.stage}" data-rank="${lane.rank}">`);
    out.push(`<text x="${n(plot.x0 - 8)}" y="${n(y + laneH / 2 + 4)}" text-anchor="end" fill="#333">${escapeXml(laneLabel(lane))}</text>`);
    out.push(`<rect class="idle" x="${n(x(t.start_s))}" y="${n(y)}" width="${n(Math.max(0, x(t.end_s) - x(t.start_s)))}" height="${laneH}" fill="${IDLE_COLOR}"/>`);
    for (const e of lane.events) {
      const x0 = x(e.start_s);
      const w = Math.max(0.5, x(e.end_s) - x0);
      const tip = `${e.kind === "F" ? "forward" : "backward"} micro-batch ${e.micro_batch}, chain ${e.chain}: ${formatTick(Number(((e.start_s - t.start_s) * unit).toPrecision(6)))}–${formatTick(Number(((e.end_s - t.start_s) * unit).toPrecision(6)))} ${ms ? "ms" : "s"}`;
      const label = String(e.micro_batch);
      const inside = w >= textWidth(label, 10) + 4 ? `<text x="${n(x0 + w / 2)}" y="${n(y + laneH / 2 + 3.5)}" text-anchor="middle" font-size="10" fill="#fff">${escapeXml(label)}</text>` : "";
      out.push(
        `<g class="ev ev-${e.kind}"><title>${escapeXml(tip)}</title><rect x="${n(x0)}" y="${n(y)}" width="${n(w)}" height="${laneH}" fill="${e.kind === "F" ? FORWARD_COLOR : BACKWARD_COLOR}" stroke="#fff" stroke-width="0.5"/>${inside}</g>`,
      );
    }
    out.push(`</g>`);
  });
  // Time axis.
  out.push(`<line x1="${n(plot.x0)}" x2="${n(plot.x1)}" y1="${n(yBottom)}" y2="${n(yBottom)}" stroke="#999"/>`);
  out.push(`<g class="axis" fill="#555">`);
  for (const v of ticks.values) out.push(`<text x="${n(tickX(v))}" y="${n(yBottom + 18)}" text-anchor="middle">${escapeXml(formatTick(v))}</text>`);
  out.push(`<text x="${n((plot.x0 + plot.x1) / 2)}" y="${n(height - 8)}" text-anchor="middle" fill="#333">${escapeXml(`time from the step's first event (${ms ? "ms" : "s"})`)}</text>`);
  out.push(`</g>`);
  out.push(`</svg>`);
  return out.join("\n");
}

function table(headers: string[], rows: string[][], cls: string): string {
  const head = headers.map((h) => `<th>${escapeXml(h)}</th>`).join("");
  const body = rows.map((r) => `<tr>${r.map((c) => `<td>${c}</td>`).join("")}</tr>`).join("\n");
  return `<table class="${cls}"><thead><tr>${head}</tr></thead><tbody>\n${body}\n</tbody></table>`;
}

const e = (v: string | number | null | undefined) => escapeXml(v === null || v === undefined || v === "" ? "—" : String(v));
const pct = (f: number | null) => (f === null ? "—" : `${(f * 100).toFixed(1)}%`);

function memoryCell(s: PipelinePlanStage): string {
  if (s.memory_bytes === null) return "—";
  if (s.cap_bytes === null || s.cap_bytes <= 0) return `${formatBytes(s.memory_bytes)} (no limit known)`;
  const share = s.memory_bytes / s.cap_bytes;
  return `${formatBytes(s.memory_bytes)} / ${formatBytes(s.cap_bytes)} (${Math.round(share * 100)}%${share > 1 ? ", over" : ""})`;
}

function configLine(p: PipelineReport): string {
  const c = p.config;
  const replicas = p.plan.chains.length;
  const parts = [
    c.pipeline_stages !== null ? `${c.pipeline_stages} stage${c.pipeline_stages === 1 ? "" : "s"}${replicas > 0 ? ` × ${replicas} replica${replicas === 1 ? "" : "s"}` : ""}` : null,
    c.micro_batches !== null ? `${c.micro_batches} micro-batches` : null,
    c.schedule !== null ? `schedule ${c.schedule}` : null,
    c.activation_codec !== null ? `activation codec ${c.activation_codec}` : null,
    p.plan.objective !== null ? `planned for ${p.plan.objective}` : null,
    p.plan.micro_batch !== null ? `micro-batch of ${formatCount(p.plan.micro_batch)} samples` : null,
    p.plan.model !== null ? `model ${p.plan.model}${p.plan.sequential === false ? " (split by its build_stages)" : ""}` : null,
    p.resumed ? "the layout of the checkpoint resumed" : null,
  ].filter((s): s is string => s !== null);
  return parts.join(", ");
}

function planTable(p: PipelineReport): string {
  if (p.plan.stages.length === 0) {
    if (p.plan.bounds && p.plan.bounds.length > 1) return `<p>Layers split at ${escapeXml(p.plan.bounds.join(" | "))}.</p>`;
    return "";
  }
  return table(
    ["Stage", "Layers", "First … last layer", "Ranks", "Params", "Est. memory / cap", "Est. compute per micro-batch"],
    p.plan.stages.map((s) => [
      e(s.index),
      e(s.layers ? formatLayers(s.layers) : null),
      e(s.names ? (s.names[0] === s.names[1] ? s.names[0] : `${s.names[0]} … ${s.names[1]}`) : null),
      e(s.ranks.length ? s.ranks.join(", ") : null),
      e(s.params === null ? null : formatCount(s.params)),
      e(memoryCell(s)),
      e(s.compute_s === null ? null : formatMs(s.compute_s)),
    ]),
    "pipeline-plan",
  );
}

function chainsLine(p: PipelineReport): string {
  if (p.plan.chains.length === 0) return "";
  const shown = p.plan.chains.slice(0, 16).map((c, d) => `replica ${d}: ranks ${c.join(" → ")}`);
  return `<p class="pipeline-chains">${escapeXml(shown.join("; ") + (p.plan.chains.length > shown.length ? "; …" : ""))}</p>`;
}

function timelineFigure(p: PipelineReport): string {
  const t = p.timeline;
  if (!t) return `<p>No step's timeline was recorded.</p>`;
  const notes: string[] = [];
  if (t.drawn < t.events) notes.push(`${formatCount(t.drawn)} of ${formatCount(t.events)} events drawn`);
  if (t.lanes_left_out > 0) notes.push(`${formatCount(t.lanes_left_out)} more workers not drawn`);
  if (t.malformed > 0) notes.push(`${formatCount(t.malformed)} malformed entries left out`);
  return `<figure>${renderTimeline(t)}${notes.length ? `<figcaption>${escapeXml(notes.join("; "))}</figcaption>` : ""}</figure>`;
}

function bubbleTable(p: PipelineReport): string {
  if (p.bubble.length === 0) return "";
  const S = p.config.pipeline_stages;
  const M = p.config.micro_batches;
  const theory = p.theory_bubble === null ? "—" : `${pct(p.theory_bubble)} ((${S} − 1) / (${M} + ${S} − 1))`;
  return table(
    ["Stage", "Workers", "Measured bubble", "Theory (S − 1) / (M + S − 1)"],
    p.bubble.map((b) => [e(b.stage), e(b.workers), e(pct(b.measured)), e(theory)]),
    "pipeline-bubble",
  );
}

function peakTable(p: PipelineReport): string {
  if (p.peak_saved_bytes.length === 0) return "";
  return table(["Stage", "Peak saved activations"], p.peak_saved_bytes.map((s) => [e(s.stage), e(formatBytes(s.bytes))]), "pipeline-peak");
}

/** The "Pipeline" section's HTML; empty without a pipeline. */
export function pipelineSection(p: PipelineReport | null): string {
  if (!p) return "";
  const why = p.why.length ? `<ul class="pipeline-why">\n${p.why.map((w) => `<li>${escapeXml(w)}</li>`).join("\n")}\n</ul>` : "";
  const parts = [
    `<h2>Pipeline</h2>`,
    `<p class="pipeline-config">${escapeXml(configLine(p) || "pipeline parallelism")}</p>`,
    planTable(p),
    chainsLine(p),
    why,
    `<h3>One step</h3>`,
    timelineFigure(p),
    bubbleTable(p),
    peakTable(p),
  ];
  return parts.filter((s) => s !== "").join("\n");
}
