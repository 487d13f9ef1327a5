// Figures, the markdown table and the SVG chart of the WAN benchmark (bench-wan.mjs), from
// per-step series. Kept apart from the harness so they are tested without namespaces.

const median = (xs) => {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const mean = (xs) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null);

/** Steps left out of rate figures: start-up, and the first steps after compression begins. */
export function measuredFrom(compressedFrom) {
  return Math.max(3, compressedFrom > 0 ? compressedFrom + 2 : 0);
}

/**
 * One run's figures. `series`: per step {step, loss, step_s, compute_s[], comm_s[],
 * allreduce_bytes[], val_loss?} with per-worker arrays; step_s excludes evaluation.
 *  - steps_per_s over the measured steps;
 *  - compute_utilisation: mean over those steps of (mean worker compute time / step time);
 *  - busbw (uncompressed only): bytes a worker's ring all-reduce sends / all-reduce time, the
 *    time taken from the worker that waited least (the last to be ready), median over steps;
 *  - time_to_target_s: training time (evaluation excluded) until validation loss <= target.
 */
export function summarise({ series, target, compressed_from: compressedFrom, rate_bits: rateBits, wire_bytes: wireBytes, steps, system, ...rest }) {
  const from = Math.min(measuredFrom(compressedFrom), Math.max(0, series.length - 2));
  const window = series.slice(from);
  const time = window.reduce((s, r) => s + r.step_s, 0);
  const uncompressed = !/psgd/.test(system);
  const busbw = uncompressed
    ? median(window.map((r) => mean(r.allreduce_bytes) / Math.max(1e-9, Math.min(...r.comm_s))))
    : null;
  let elapsed = 0;
  let timeToTarget = null;
  let stepToTarget = null;
  const curve = [];
  for (const r of series) {
    elapsed += r.step_s;
    if (r.val_loss === undefined) continue;
    curve.push({ step: r.step, t: round(elapsed, 3), val_loss: round(r.val_loss, 4) });
    if (timeToTarget === null && r.val_loss <= target) {
      timeToTarget = elapsed;
      stepToTarget = r.step + 1;
    }
  }
  return {
    ...rest,
    system,
    rate_bits: rateBits,
    steps,
    measured_from_step: from,
    steps_per_s: window.length / Math.max(1e-9, time),
    compute_utilisation: mean(window.map((r) => mean(r.compute_s) / Math.max(1e-9, r.step_s))),
    busbw_bytes_per_s: busbw,
    busbw_fraction: busbw === null ? null : (busbw * 8) / rateBits,
    wire_bytes: wireBytes,
    wire_bytes_per_step: wireBytes === null || wireBytes === undefined ? null : wireBytes / series.length,
    target_val_loss: target,
    time_to_target_s: timeToTarget,
    steps_to_target: stepToTarget,
    final_val_loss: curve.length ? curve[curve.length - 1].val_loss : null,
    train_time_s: round(elapsed, 3),
    // Where a step's time goes (medians over the measured steps): the slowest worker's compute,
    // the least-waiting worker's communication, and what is left (coordination, hand-offs).
    breakdown: {
      step_s: median(window.map((r) => r.step_s)),
      slowest_compute_s: median(window.map((r) => Math.max(...r.compute_s))),
      least_comm_s: median(window.map((r) => Math.min(...r.comm_s))),
    },
    val_curve: curve,
    step_s: series.map((r) => round(r.step_s, 4)),
  };
}

function round(x, digits) {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

const RATE_NAMES = { 1e9: "1 Gbit/s", 100e6: "100 Mbit/s", 20e6: "20 Mbit/s" };
const rateName = (bits) => RATE_NAMES[bits] ?? `${bits / 1e6} Mbit/s`;
const pct = (x) => (x === null || x === undefined ? "—" : `${(x * 100).toFixed(0)}%`);
const fixed = (x, d = 2) => (x === null || x === undefined ? "—" : x.toFixed(d));
const ratio = (a, b) => (a === null || b === null || a === undefined || b === undefined || !(b > 0) ? null : a / b);

/** The runs of one scenario (model, rate, RTT), keyed by system. */
function scenarios(results) {
  const groups = new Map();
  for (const run of results.runs) {
    const key = `${run.model}|${run.rate_bits}|${run.rtt_ms}`;
    if (!groups.has(key)) groups.set(key, { model: run.model, rate_bits: run.rate_bits, rtt_ms: run.rtt_ms, runs: {} });
    groups.get(key).runs[run.system] = run;
  }
  return [...groups.values()];
}

/** Each target of the issue, with the figure that decides it and whether it is met. */
export function targets(results) {
  const out = [];
  // Without namespaces DDP ran unshaped: nothing is compared with it.
  const comparable = results.shaping !== "transport";
  for (const g of scenarios(results)) {
    const nimble = g.runs.nimble;
    const ddp = g.runs.ddp;
    const psgd4 = g.runs["nimble-psgd4"];
    const where = `${g.model}, ${rateName(g.rate_bits)}, RTT ${g.rtt_ms} ms`;
    if (g.rate_bits === 100e6 && g.rtt_ms === 0 && nimble && !nimble.error) {
      out.push({ target: "uncompressed ring bus bandwidth >= 90% of the link at 100 Mbit/s", where, value: nimble.busbw_fraction, met: nimble.busbw_fraction >= 0.9 });
    }
    if (comparable && nimble && ddp && !nimble.error && !ddp.error) {
      const r = ratio(nimble.steps_per_s, ddp.steps_per_s);
      out.push({ target: "Nimble uncompressed steps/s >= 0.95x torch DDP (gloo)", where, value: r, met: r >= 0.95 });
    }
    if (comparable && g.rate_bits === 100e6 && psgd4 && ddp && !psgd4.error && !ddp.error) {
      const r = psgd4.time_to_target_s === null ? null : ddp.time_to_target_s === null ? Infinity : ddp.time_to_target_s / psgd4.time_to_target_s;
      out.push({ target: "Nimble PowerSGD r4 reaches the target loss >= 5x sooner than uncompressed DDP", where, value: r, met: r !== null && r >= 5 });
    }
  }
  return out;
}

/**
 * One row per scenario: steps/s of every system, Nimble uncompressed against DDP, both bus
 * bandwidths, and training time to the target loss of Nimble PowerSGD r4 against DDP.
 */
export function compactTable(results) {
  const order = ["nimble", "nimble-psgd1", "nimble-psgd4", "ddp", "ddp-psgd4"];
  const lines = [
    `| model | link | RTT | ${order.map((s) => `${s} steps/s`).join(" | ")} | nimble / ddp | bus bw nimble / ddp | to target: ddp / nimble-psgd4 |`,
    `| --- | --- | --- | ${order.map(() => "---").join(" | ")} | --- | --- | --- |`,
  ];
  for (const g of scenarios(results)) {
    const ok = (s) => (g.runs[s] && !g.runs[s].error ? g.runs[s] : null);
    const sps = order.map((s) => (ok(s) ? fixed(ok(s).steps_per_s) : "—"));
    const r = ratio(ok("nimble")?.steps_per_s, ok("ddp")?.steps_per_s);
    const bw = `${pct(ok("nimble")?.busbw_fraction)} / ${pct(ok("ddp")?.busbw_fraction)}`;
    const a = ok("ddp")?.time_to_target_s;
    const b = ok("nimble-psgd4")?.time_to_target_s;
    const ttt = a && b ? `${a.toFixed(1)} s / ${b.toFixed(1)} s = ${(a / b).toFixed(1)}x` : "—";
    lines.push(`| ${g.model} | ${rateName(g.rate_bits)} | ${g.rtt_ms} ms | ${sps.join(" | ")} | ${r === null ? "—" : `${r.toFixed(2)}x`} | ${bw} | ${ttt} |`);
  }
  return lines.join("\n") + "\n";
}

/** The results as markdown: one table of every run, then the targets. */
export function markdownTable(results) {
  const lines = [
    `# WAN benchmark (${results.date.slice(0, 10)}, ${results.machine.cpu}, ${results.machine.cores} cores, ${results.workers} providers, shaping: ${results.shaping})`,
    "",
    results.shaping_note ? `**${results.shaping_note}.**\n` : "",
    `Latency: ${results.latency}.`,
    "",
    compactTable(results),
    "| model | link | RTT | system | steps/s | vs DDP | compute util. | bus bw / link | wire MB/step | time to target | vs DDP | final val loss |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ];
  const comparable = results.shaping !== "transport";
  for (const g of scenarios(results)) {
    const ddp = comparable ? g.runs.ddp : undefined;
    for (const [system, run] of Object.entries(g.runs)) {
      const head = `| ${g.model} | ${rateName(g.rate_bits)} | ${g.rtt_ms} ms | ${system}`;
      if (run.error) {
        lines.push(`${head} | failed: ${run.error.replace(/\|/g, "/").slice(0, 120)} | | | | | | | |`);
        continue;
      }
      const unshaped = !comparable && system.startsWith("ddp");
      const vsDdp = system === "ddp" ? (unshaped ? "unshaped" : "1.00x") : fixed(ratio(run.steps_per_s, ddp?.steps_per_s)) + (ddp ? "x" : "");
      const ttt = run.time_to_target_s === null ? `not in ${run.steps} steps` : `${run.time_to_target_s.toFixed(1)} s (step ${run.steps_to_target})`;
      const tttVs = system === "ddp" ? (unshaped ? "—" : "1.0x") : (() => {
        if (!ddp || ddp.error) return "—";
        if (run.time_to_target_s === null) return "—";
        if (ddp.time_to_target_s === null) return `> ${(ddp.train_time_s / run.time_to_target_s).toFixed(1)}x`;
        return `${(ddp.time_to_target_s / run.time_to_target_s).toFixed(1)}x`;
      })();
      lines.push(`${head} | ${fixed(run.steps_per_s)} | ${vsDdp} | ${pct(run.compute_utilisation)} | ${unshaped ? "—" : pct(run.busbw_fraction)} | ${run.wire_bytes_per_step === null ? "—" : (run.wire_bytes_per_step / 1e6).toFixed(2)} | ${ttt} | ${tttVs} | ${fixed(run.final_val_loss, 3)} |`);
    }
  }
  const t = targets(results);
  if (t.length) {
    lines.push("", "| target | where | measured | met |", "| --- | --- | --- | --- |");
    for (const x of t) {
      const v = x.value === null ? "not reached" : x.value === Infinity ? "DDP never reached it" : x.target.includes("bus") ? pct(x.value) : `${x.value.toFixed(2)}x`;
      lines.push(`| ${x.target} | ${x.where} | ${v} | ${x.met ? "yes" : "**no**"} |`);
    }
  }
  return lines.filter((l, i) => l !== "" || lines[i - 1] !== "").join("\n") + "\n";
}

const COLOURS = { nimble: "#1f77b4", "nimble-psgd1": "#2ca02c", "nimble-psgd4": "#17becf", ddp: "#d62728", "ddp-psgd4": "#ff7f0e" };

/** Validation loss against training time, one panel per model, for one link and RTT. */
export function lossChartSvg(results, rateBits = 100e6, rttMs = 0) {
  const groups = scenarios(results).filter((g) => g.rate_bits === rateBits && g.rtt_ms === rttMs);
  const W = 460;
  const H = 320;
  const pad = { l: 56, r: 16, t: 36, b: 44 };
  const panels = groups.map((g, i) => {
    const runs = Object.entries(g.runs).filter(([, r]) => !r.error && r.val_curve.length);
    const xs = runs.flatMap(([, r]) => r.val_curve.map((p) => p.t));
    const ys = runs.flatMap(([, r]) => r.val_curve.map((p) => p.val_loss));
    const xMax = Math.max(1e-3, ...xs);
    const yMin = Math.min(...ys, g.runs[runs[0]?.[0]]?.target_val_loss ?? Infinity);
    const yMax = Math.max(...ys);
    const sx = (x) => pad.l + (x / xMax) * (W - pad.l - pad.r);
    const sy = (y) => pad.t + (1 - (y - yMin) / Math.max(1e-9, yMax - yMin)) * (H - pad.t - pad.b);
    const target = runs[0]?.[1].target_val_loss;
    const parts = [
      `<g transform="translate(${i * W},0)">`,
      `<text x="${W / 2}" y="20" text-anchor="middle" font-size="14">${g.model}: validation loss vs training time (${rateName(rateBits)}, RTT ${rttMs} ms)</text>`,
      `<line x1="${pad.l}" y1="${H - pad.b}" x2="${W - pad.r}" y2="${H - pad.b}" stroke="#333"/>`,
      `<line x1="${pad.l}" y1="${pad.t}" x2="${pad.l}" y2="${H - pad.b}" stroke="#333"/>`,
      `<text x="${(W + pad.l) / 2}" y="${H - 10}" text-anchor="middle" font-size="12">training time (s)</text>`,
      `<text x="14" y="${H / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 14 ${H / 2})">val loss</text>`,
    ];
    for (let k = 0; k <= 4; k++) {
      const x = (xMax * k) / 4;
      const y = yMin + ((yMax - yMin) * k) / 4;
      parts.push(`<text x="${sx(x)}" y="${H - pad.b + 16}" text-anchor="middle" font-size="10">${x.toFixed(x < 10 ? 1 : 0)}</text>`);
      parts.push(`<text x="${pad.l - 6}" y="${sy(y) + 3}" text-anchor="end" font-size="10">${y.toFixed(2)}</text>`);
    }
    if (target !== undefined && Number.isFinite(target)) {
      parts.push(`<line x1="${pad.l}" y1="${sy(target)}" x2="${W - pad.r}" y2="${sy(target)}" stroke="#999" stroke-dasharray="4 3"/>`);
      parts.push(`<text x="${W - pad.r}" y="${sy(target) - 4}" text-anchor="end" font-size="10" fill="#666">target ${target}</text>`);
    }
    runs.forEach(([system, r], j) => {
      const pts = r.val_curve.map((p) => `${sx(p.t).toFixed(1)},${sy(p.val_loss).toFixed(1)}`).join(" ");
      const colour = COLOURS[system] ?? "#555";
      parts.push(`<polyline fill="none" stroke="${colour}" stroke-width="2" points="${pts}"/>`);
      parts.push(`<rect x="${W - pad.r - 120}" y="${pad.t + 6 + j * 16}" width="10" height="10" fill="${colour}"/>`);
      parts.push(`<text x="${W - pad.r - 105}" y="${pad.t + 15 + j * 16}" font-size="11">${system}</text>`);
    });
    parts.push("</g>");
    return parts.join("\n");
  });
  const width = Math.max(1, groups.length) * W;
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${H}" viewBox="0 0 ${width} ${H}" font-family="sans-serif">`,
    `<rect width="${width}" height="${H}" fill="white"/>`,
    ...(panels.length ? panels : [`<text x="20" y="40" font-size="14">no runs at ${rateName(rateBits)}, RTT ${rttMs} ms</text>`]),
    "</svg>",
    "",
  ].join("\n");
}
