/**
 * SVG charts as strings, rendered on our side so a report needs no script and no chart
 * library to display: axes with "nice" ticks, lines, points, bars, stacked bands, vertical
 * markers and a legend. Every text that reaches the markup goes through `escapeXml`.
 */

export interface Point {
  x: number;
  y: number;
  /** Lower edge of a band (stacked areas); 0 when absent. */
  y0?: number;
}

export type SeriesKind = "line" | "points" | "bars" | "area";

export interface Series {
  name: string;
  kind: SeriesKind;
  points: Point[];
  color?: string;
  dashed?: boolean;
  /** "right": drawn against the secondary axis (metrics with another range than the left one). */
  axis?: "left" | "right";
}

export interface Marker {
  x: number;
  /** Short text drawn at the top of the line ("F1"). */
  label: string;
  /** Hover text. */
  title: string;
  /** CSS class: "fault-marker" or "leftout-marker". */
  kind: "fault-marker" | "leftout-marker";
}

export interface ChartSpec {
  /** Written as data-chart="<id>". */
  id: string;
  title: string;
  xLabel: string;
  yLabel: string;
  y2Label?: string;
  series: Series[];
  markers?: Marker[];
  width?: number;
  height?: number;
  /** Fixed y range (shares: 0..1); otherwise from the data, starting at 0 when `yFromZero`. */
  yDomain?: [number, number];
  yFromZero?: boolean;
  /** Ticks on whole numbers only (steps). */
  xInteger?: boolean;
  formatX?: (x: number) => string;
  formatY?: (y: number) => string;
  formatY2?: (y: number) => string;
}

/** Distinct colors that stay apart for the common color-vision deficiencies (Tableau 10). */
export const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
const FAULT_COLOR = "#d62728";
const LEFT_OUT_COLOR = "#7a5195";
const FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";

export function escapeXml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!);
}

/** A coordinate for an attribute: two decimals, and never NaN (a broken value draws at 0). */
function n(v: number): string {
  return Number.isFinite(v) ? String(Math.round(v * 100) / 100) : "0";
}

export interface Ticks {
  min: number;
  max: number;
  values: number[];
}

/**
 * Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi], about `count`
 * of them; the returned range is widened to the outer ticks. A zero-width or empty range
 * is widened first so there is always something to divide.
 */
export function niceTicks(lo: number, hi: number, count = 5, integer = false): Ticks {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) [lo, hi] = [0, 1];
  if (lo > hi) [lo, hi] = [hi, lo];
  if (lo === hi) {
    const pad = lo === 0 ? 1 : Math.abs(lo) * 0.1;
    [lo, hi] = [lo - pad, hi + pad];
    if (integer) [lo, hi] = [Math.floor(lo), Math.ceil(hi)];
  }
  const raw = (hi - lo) / Math.max(1, count);
  const power = 10 ** Math.floor(Math.log10(raw));
  let step = ([1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) ?? 10 * power);
  if (integer) step = Math.max(1, Math.round(step));
  const min = Math.floor(lo / step + 1e-9) * step;
  const max = Math.ceil(hi / step - 1e-9) * step;
  const values: number[] = [];
  // Rounded to the step's precision so 0.1 + 0.2 shows as 0.3.
  const decimals = Math.max(0, -Math.floor(Math.log10(step)) + 2);
  for (let v = min; v <= max + step * 1e-9; v += step) values.push(Number(v.toFixed(decimals)));
  return { min, max, values };
}

/** Default tick text: as few decimals as the ticks need. */
export function formatTick(v: number): string {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e6 || a < 1e-3) return v.toExponential(1).replace("e+", "e");
  return String(Number(v.toPrecision(6)));
}

/** Pixel width of a label at our 12px font, roughly: enough to lay out legends and margins. */
function textWidth(text: string, px = 12): number {
  return text.length * px * 0.55;
}

/** [min, max] of a non-empty list, without spreading it into arguments (long runs have many points). */
function extent(values: number[]): [number, number] {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return [lo, hi];
}

function finitePoints(points: Point[]): Point[] {
  return points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y) && (p.y0 === undefined || Number.isFinite(p.y0)));
}

interface Scale {
  (v: number): number;
  ticks: Ticks;
}

function linear(ticks: Ticks, from: number, to: number): Scale {
  const span = ticks.max - ticks.min || 1;
  const scale = ((v: number) => from + ((v - ticks.min) / span) * (to - from)) as Scale;
  scale.ticks = ticks;
  return scale;
}

/** Smallest gap between distinct x values: bar width and hover column width. */
function minGap(xs: number[]): number {
  const sorted = [...new Set(xs)].sort((a, b) => a - b);
  let gap = Infinity;
  for (let i = 1; i < sorted.length; i++) gap = Math.min(gap, sorted[i]! - sorted[i - 1]!);
  return Number.isFinite(gap) ? gap : 1;
}

/**
 * Stack layers that share x values into bands: each layer's points get y0 (top of the
 * layers below) and y (y0 plus its own value). A layer missing an x counts 0 there.
 */
export function stack(layers: { name: string; points: Point[]; color?: string }[]): Series[] {
  const xs = [...new Set(layers.flatMap((l) => finitePoints(l.points).map((p) => p.x)))].sort((a, b) => a - b);
  const base = new Map(xs.map((x) => [x, 0]));
  return layers.map((layer) => {
    const own = new Map(finitePoints(layer.points).map((p) => [p.x, p.y]));
    const points = xs.map((x) => {
      const y0 = base.get(x)!;
      const y = y0 + (own.get(x) ?? 0);
      base.set(x, y);
      return { x, y0, y };
    });
    return { name: layer.name, kind: "area" as const, points, ...(layer.color ? { color: layer.color } : {}) };
  });
}

/** Trailing moving average over `window` points (the first ones average what there is). */
export function movingAverage(points: Point[], window: number): Point[] {
  if (window <= 1) return points;
  return points.map((p, i) => {
    const slice = points.slice(Math.max(0, i - window + 1), i + 1);
    return { x: p.x, y: slice.reduce((a, q) => a + q.y, 0) / slice.length };
  });
}

/**
 * At most about `buckets` * 2 points of a line: each bucket of consecutive x's keeps its
 * lowest and highest point, so spikes survive while a 100k-step run stays a small file.
 * Bars and bands keep the first point of each bucket.
 */
export function thin(points: Point[], buckets: number, kind: SeriesKind): Point[] {
  if (points.length <= buckets * 2 || buckets < 1) return points;
  const size = Math.ceil(points.length / buckets);
  const out: Point[] = [];
  for (let i = 0; i < points.length; i += size) {
    const bucket = points.slice(i, i + size);
    if (kind !== "line") {
      out.push(bucket[0]!);
      continue;
    }
    let lo = bucket[0]!;
    let hi = bucket[0]!;
    for (const p of bucket) {
      if (p.y < lo.y) lo = p;
      if (p.y > hi.y) hi = p;
    }
    out.push(...(lo === hi ? [lo] : lo.x < hi.x ? [lo, hi] : [hi, lo]));
  }
  return out;
}

/** One chart as an `<svg>` element. Empty series draw the axes and a "No data" note. */
export function renderChart(spec: ChartSpec): string {
  const width = spec.width ?? 900;
  const height = spec.height ?? 320;
  const formatX = spec.formatX ?? formatTick;
  const formatY = spec.formatY ?? formatTick;
  const formatY2 = spec.formatY2 ?? formatTick;
  const markers = (spec.markers ?? []).filter((m) => Number.isFinite(m.x));
  // One bucket per 2 pixels of plot is more detail than the eye can use.
  const buckets = Math.floor((width - 120) / 2);
  const series = spec.series.map((s, i) => ({
    ...s,
    points: s.kind === "points" ? finitePoints(s.points) : thin(finitePoints(s.points), buckets, s.kind),
    color: s.color ?? PALETTE[i % PALETTE.length]!,
  }));
  const left = series.filter((s) => s.axis !== "right");
  const right = series.filter((s) => s.axis === "right");
  const hasData = series.some((s) => s.points.length > 0);

  // Legend rows above the plot, wrapped to the width.
  const legendItems = [
    ...series.filter((s) => s.points.length > 0).map((s) => ({ name: s.axis === "right" ? `${s.name} (right axis)` : s.name, color: s.color, kind: s.kind, dashed: !!s.dashed })),
  ];
  const legendRows: { items: typeof legendItems; }[] = [];
  {
    let row: typeof legendItems = [];
    let used = 0;
    for (const item of legendItems) {
      const w = 26 + textWidth(item.name) + 16;
      if (row.length > 0 && used + w > width - 40) {
        legendRows.push({ items: row });
        row = [];
        used = 0;
      }
      row.push(item);
      used += w;
    }
    if (row.length > 0) legendRows.push({ items: row });
  }

  // Scales: x over every series and marker; y from the left series, y2 from the right ones.
  const allX = [...series.flatMap((s) => s.points.map((p) => p.x)), ...markers.map((m) => m.x)];
  const bars = series.some((s) => s.kind === "bars" && s.points.length > 0);
  const barGap = minGap(series.filter((s) => s.kind === "bars").flatMap((s) => s.points.map((p) => p.x)));
  let [xLo, xHi] = allX.length ? extent(allX) : [0, 1];
  // Bars are centred on their x: leave half a bar of room at either end.
  if (bars) [xLo, xHi] = [xLo - barGap / 2, xHi + barGap / 2];
  const yRange = (ss: typeof series, fromZero: boolean): [number, number] => {
    const ys = ss.flatMap((s) => s.points.flatMap((p) => (p.y0 === undefined ? [p.y] : [p.y, p.y0])));
    if (ys.length === 0) return [0, 1];
    const [lo, hi] = extent(ys);
    return [fromZero || ss.some((s) => s.kind === "bars" || s.kind === "area") ? Math.min(0, lo) : lo, hi];
  };
  const [yLo, yHi] = spec.yDomain ?? yRange(left, !!spec.yFromZero);
  const yTicks = niceTicks(yLo, yHi, 5);
  const y2Ticks = right.length ? niceTicks(...yRange(right, false), 5) : null;
  const yTickWidth = Math.max(...yTicks.values.map((v) => textWidth(formatY(v))));
  const y2TickWidth = y2Ticks ? Math.max(...y2Ticks.values.map((v) => textWidth(formatY2(v)))) : 0;

  const margin = {
    top: 40 + legendRows.length * 20,
    right: y2Ticks ? y2TickWidth + 40 : 24,
    bottom: 46,
    left: yTickWidth + 40,
  };
  const plot = { x0: margin.left, x1: width - margin.right, y0: height - margin.bottom, y1: margin.top };
  const xTicks = niceTicks(xLo, xHi, Math.max(2, Math.floor((plot.x1 - plot.x0) / 90)), spec.xInteger);
  // The axis spans the data, not the rounded ticks, so lines reach both edges.
  const xDomain: Ticks = { min: xLo === xHi ? xTicks.min : xLo, max: xLo === xHi ? xTicks.max : xHi, values: xTicks.values.filter((v) => v >= (xLo === xHi ? xTicks.min : xLo) - 1e-9 && v <= (xLo === xHi ? xTicks.max : xHi) + 1e-9) };
  const x = linear(xDomain, plot.x0, plot.x1);
  const y = linear(yTicks, plot.y0, plot.y1);
  const y2 = y2Ticks ? linear(y2Ticks, plot.y0, plot.y1) : y;

  const out: string[] = [];
  out.push(
    `<svg data-chart="${escapeXml(spec.id)}" class="chart" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" role="img" aria-label="${escapeXml(spec.title)}" font-family="${escapeXml(FONT)}" font-size="12">`,
  );
  out.push(`<title>${escapeXml(spec.title)}</title>`);
  out.push(`<rect width="${width}" height="${height}" fill="#fff"/>`);
  out.push(`<text x="${n(plot.x0)}" y="22" font-size="15" font-weight="600" fill="#222">${escapeXml(spec.title)}</text>`);

  // Legend.
  legendRows.forEach((row, r) => {
    let lx = plot.x0;
    const ly = 40 + r * 20;
    for (const item of row.items) {
      const swatch =
        item.kind === "points"
          ? `<circle cx="${n(lx + 9)}" cy="${n(ly - 4)}" r="4" fill="${item.color}"/>`
          : item.kind === "line"
            ? `<line x1="${n(lx)}" y1="${n(ly - 4)}" x2="${n(lx + 18)}" y2="${n(ly - 4)}" stroke="${item.color}" stroke-width="2.5"${item.dashed ? ' stroke-dasharray="5 3"' : ""}/>`
            : `<rect x="${n(lx)}" y="${n(ly - 10)}" width="18" height="12" rx="2" fill="${item.color}"${item.kind === "area" ? ' fill-opacity="0.85"' : ""}/>`;
      out.push(`<g class="legend-item">${swatch}<text x="${n(lx + 24)}" y="${n(ly)}" fill="#333">${escapeXml(item.name)}</text></g>`);
      lx += 26 + textWidth(item.name) + 16;
    }
  });

  // Grid and axes.
  out.push(`<g class="grid" stroke="#e6e6e6" stroke-width="1">`);
  for (const v of yTicks.values) out.push(`<line x1="${n(plot.x0)}" x2="${n(plot.x1)}" y1="${n(y(v))}" y2="${n(y(v))}"/>`);
  for (const v of xDomain.values) out.push(`<line x1="${n(x(v))}" x2="${n(x(v))}" y1="${n(plot.y0)}" y2="${n(plot.y1)}"/>`);
  out.push(`</g>`);
  out.push(`<g class="axis" fill="#555">`);
  for (const v of yTicks.values) out.push(`<text x="${n(plot.x0 - 8)}" y="${n(y(v) + 4)}" text-anchor="end">${escapeXml(formatY(v))}</text>`);
  if (y2Ticks) for (const v of y2Ticks.values) out.push(`<text x="${n(plot.x1 + 8)}" y="${n(y2(v) + 4)}">${escapeXml(formatY2(v))}</text>`);
  for (const v of xDomain.values) out.push(`<text x="${n(x(v))}" y="${n(plot.y0 + 18)}" text-anchor="middle">${escapeXml(formatX(v))}</text>`);
  out.push(`<text x="${n((plot.x0 + plot.x1) / 2)}" y="${n(height - 8)}" text-anchor="middle" fill="#333">${escapeXml(spec.xLabel)}</text>`);
  out.push(`<text transform="translate(14 ${n((plot.y0 + plot.y1) / 2)}) rotate(-90)" text-anchor="middle" fill="#333">${escapeXml(spec.yLabel)}</text>`);
  if (y2Ticks && spec.y2Label) {
    out.push(`<text transform="translate(${n(width - 12)} ${n((plot.y0 + plot.y1) / 2)}) rotate(90)" text-anchor="middle" fill="#333">${escapeXml(spec.y2Label)}</text>`);
  }
  out.push(`</g>`);
  out.push(`<line x1="${n(plot.x0)}" x2="${n(plot.x1)}" y1="${n(plot.y0)}" y2="${n(plot.y0)}" stroke="#999"/>`);

  if (!hasData) {
    out.push(`<text x="${n((plot.x0 + plot.x1) / 2)}" y="${n((plot.y0 + plot.y1) / 2)}" text-anchor="middle" fill="#888" font-size="14">No data</text>`);
  }

  // Data: areas first (underneath), then bars, lines, points on top.
  // Hover columns go above lines and bands but under points and markers, which have their own titles.
  const order: (SeriesKind | "hover")[] = ["area", "bars", "line", "hover", "points"];
  // Bars a few pixels wide get a gap between them; thinner ones touch, or they would read as stripes.
  const barSlot = Math.abs(x(xLo + barGap) - x(xLo));
  const barWidth = Math.max(1, barSlot >= 4 ? barSlot * 0.8 : barSlot + 0.5);
  for (const kind of order) {
    if (kind === "hover") {
      out.push(hoverColumns(series, x, plot, spec, formatX, formatY, formatY2));
      continue;
    }
    for (const s of series.filter((t) => t.kind === kind && t.points.length > 0)) {
      const sy = s.axis === "right" ? y2 : y;
      const cls = `series series-${kind}`;
      if (kind === "area") {
        const top = s.points.map((p) => `${n(x(p.x))},${n(sy(p.y))}`);
        const bottom = [...s.points].reverse().map((p) => `${n(x(p.x))},${n(sy(p.y0 ?? 0))}`);
        out.push(`<polygon class="${cls}" points="${[...top, ...bottom].join(" ")}" fill="${s.color}" fill-opacity="0.85" stroke="#fff" stroke-width="0.5"><title>${escapeXml(s.name)}</title></polygon>`);
      } else if (kind === "bars") {
        out.push(`<g class="${cls}" fill="${s.color}">`);
        for (const p of s.points) {
          const top = sy(Math.max(p.y, 0));
          const h = Math.abs(sy(p.y) - sy(0));
          out.push(`<rect x="${n(x(p.x) - barWidth / 2)}" y="${n(top)}" width="${n(barWidth)}" height="${n(h)}"/>`);
        }
        out.push(`</g>`);
      } else if (kind === "line") {
        const d = s.points.map((p, i) => `${i === 0 ? "M" : "L"}${n(x(p.x))},${n(sy(p.y))}`).join("");
        // A single point has no segment to stroke: show it as a dot.
        const dot = s.points.length === 1 ? `<circle cx="${n(x(s.points[0]!.x))}" cy="${n(sy(s.points[0]!.y))}" r="3" fill="${s.color}"/>` : "";
        out.push(`<g class="${cls}"><path d="${d}" fill="none" stroke="${s.color}" stroke-width="2" stroke-linejoin="round"${s.dashed ? ' stroke-dasharray="6 4"' : ""}/>${dot}</g>`);
      } else {
        out.push(`<g class="${cls}" fill="${s.color}" stroke="#fff" stroke-width="1.5">`);
        for (const p of s.points) {
          out.push(`<circle cx="${n(x(p.x))}" cy="${n(sy(p.y))}" r="4.5"><title>${escapeXml(`${s.name} ${formatTickFor(s, p.y, formatY, formatY2)} at ${spec.xLabel.toLowerCase()} ${formatX(p.x)}`)}</title></circle>`);
        }
        out.push(`</g>`);
      }
    }
  }

  // Markers above the data, labels at the top of the plot.
  // Labels that would overlap the previous one drop a row.
  const labelEnds: number[] = [];
  for (const m of [...markers].sort((a, b) => a.x - b.x)) {
    const mx = x(m.x);
    const color = m.kind === "fault-marker" ? FAULT_COLOR : LEFT_OUT_COLOR;
    const half = textWidth(m.label, 11) / 2 + 4;
    let row = labelEnds.findIndex((end) => end < mx - half - 2);
    if (row < 0) row = labelEnds.length;
    labelEnds[row] = mx + half;
    const ly = plot.y1 - 15 + row * 17;
    out.push(
      `<g class="${m.kind}"><title>${escapeXml(m.title)}</title>` +
        `<line x1="${n(mx)}" x2="${n(mx)}" y1="${n(plot.y0)}" y2="${n(plot.y1)}" stroke="${color}" stroke-width="1.5" stroke-dasharray="4 3"/>` +
        `<rect x="${n(mx - half)}" y="${n(ly)}" width="${n(half * 2)}" height="15" rx="3" fill="${color}"/>` +
        `<text x="${n(mx)}" y="${n(ly + 11)}" text-anchor="middle" font-size="11" fill="#fff">${escapeXml(m.label)}</text></g>`,
    );
  }

  out.push(`</svg>`);
  return out.join("\n");
}

function formatTickFor(s: Series, v: number, formatY: (v: number) => string, formatY2: (v: number) => string): string {
  return s.axis === "right" ? formatY2(v) : formatY(v);
}

/**
 * Transparent columns, one per x (or per group of x's on a crowded axis), each with a
 * `<title>` listing every series' value there: hover anywhere in the plot to read numbers.
 */
function hoverColumns(
  series: (Series & { color: string })[],
  x: Scale,
  plot: { x0: number; x1: number; y0: number; y1: number },
  spec: ChartSpec,
  formatX: (v: number) => string,
  formatY: (v: number) => string,
  formatY2: (v: number) => string,
): string {
  const columnSeries = series.filter((s) => s.kind !== "points");
  const xs = [...new Set(columnSeries.flatMap((s) => s.points.map((p) => p.x)))].sort((a, b) => a - b);
  if (xs.length === 0) return "";
  // At most one column per 3 pixels: long runs get every k-th x.
  const every = Math.max(1, Math.ceil(xs.length / ((plot.x1 - plot.x0) / 3)));
  const shown = xs.filter((_, i) => i % every === 0);
  const lookup = columnSeries.map((s) => ({ s, at: new Map(s.points.map((p) => [p.x, p])) }));
  const out = [`<g class="hover" fill="transparent">`];
  shown.forEach((v, i) => {
    const from = i === 0 ? plot.x0 : (x(shown[i - 1]!) + x(v)) / 2;
    const to = i === shown.length - 1 ? plot.x1 : (x(v) + x(shown[i + 1]!)) / 2;
    const lines = [`${spec.xLabel} ${formatX(v)}`];
    for (const { s, at } of lookup) {
      const p = at.get(v);
      if (!p) continue;
      const value = s.kind === "area" ? p.y - (p.y0 ?? 0) : p.y;
      lines.push(`${s.name}: ${formatTickFor(s, value, formatY, formatY2)}`);
    }
    out.push(`<rect x="${n(from)}" y="${n(plot.y1)}" width="${n(Math.max(0, to - from))}" height="${n(plot.y0 - plot.y1)}"><title>${escapeXml(lines.join("\n"))}</title></rect>`);
  });
  out.push(`</g>`);
  return out.join("");
}
