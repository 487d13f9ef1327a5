// Figures, the markdown table and the SVG chart of the WAN benchmark (bench-wan.mjs), from
// per-step series. Kept apart from the harness so they are tested without namespaces.

import { mean, median } from "./stats.mjs";

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
 *
 * A row may also cover several inner steps (DiLoCo: one row per round): `inner_steps` (the
 * round's inner step count; 1 when absent), `samples` (the round's; `batch` x inner_steps
 * when absent), `sync_comm_s`/`hidden_s` (the round's pseudo-gradient all-reduce: the time it
 * was exposed, and the time it ran hidden behind inner steps). Per-round series are measured over every round (a run
 * has few), steps/s counts inner steps, and bus bandwidth is not computed (the all-reduce is
 * not one step's gradient). Every run also gets, over the whole run: samples_per_s;
 * compute_only_samples_per_s (samples over training time less the least-waiting worker's
 * communication: the no-communication reference of the DiLoCo suite); sync bytes per sample
 * (`sent_bytes` of the workers, or `allreduce_bytes` where a row has none: DDP) and wire bytes
 * per sample; the hidden fraction of sync.
 */
export function summarise({ series, target, compressed_from: compressedFrom, rate_bits: rateBits, wire_bytes: wireBytes, steps, system, batch, ...rest }) {
  const inner = (r) => r.inner_steps ?? 1;
  const perRound = series.some((r) => inner(r) > 1);
  const from = perRound ? 0 : Math.min(measuredFrom(compressedFrom), Math.max(0, series.length - 2));
  const window = series.slice(from);
  const time = window.reduce((s, r) => s + r.step_s, 0);
  const uncompressed = !perRound && !/psgd|diloco/.test(system);
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
  const sum = (xs) => xs.reduce((a, b) => a + b, 0);
  const innerDone = sum(series.map(inner));
  const samplesOf = (r) => r.samples ?? (batch === undefined ? null : batch * inner(r));
  const samples = series.every((r) => samplesOf(r) !== null) ? sum(series.map(samplesOf)) : null;
  const trainTime = sum(series.map((r) => r.step_s));
  const lessComm = sum(series.map((r) => Math.max(0, r.step_s - Math.min(...r.comm_s))));
  const syncBytes = sum(series.map((r) => sum(r.sent_bytes ?? r.allreduce_bytes)));
  const ddpBytes = sum(series.map((r) => sum(r.allreduce_bytes)));
  // A round's sync is its exposed all-reduce time (sync_comm_s) plus the part hidden behind inner steps.
  const hiddenS = sum(series.map((r) => r.hidden_s ?? 0));
  const syncS = sum(series.map((r) => r.sync_comm_s ?? 0)) + hiddenS;
  const perSample = (x) => (samples ? x / samples : null);
  return {
    ...rest,
    system,
    rate_bits: rateBits,
    steps,
    measured_from_step: from,
    steps_per_s: (perRound ? sum(window.map(inner)) : window.length) / Math.max(1e-9, time),
    per_round: perRound,
    rounds: series.length,
    inner_steps_done: innerDone,
    samples,
    samples_per_s: samples === null ? null : samples / Math.max(1e-9, trainTime),
    compute_only_samples_per_s: samples === null ? null : samples / Math.max(1e-9, lessComm),
    // Within the run (outside load slows both sides alike): the slowest worker's compute over the time.
    slowest_compute_share: sum(series.map((r) => Math.max(...r.compute_s))) / Math.max(1e-9, trainTime),
    sync_bytes: syncBytes,
    sync_bytes_per_sample: perSample(syncBytes),
    // What uncompressed DDP would send for the same samples (the workers' own count).
    uncompressed_bytes_per_sample: perSample(ddpBytes),
    wire_bytes_per_sample: wireBytes === null || wireBytes === undefined ? null : perSample(wireBytes),
    sync_s: series.some((r) => r.sync_comm_s !== undefined) ? syncS : null,
    hidden_s: series.some((r) => r.hidden_s !== undefined) ? hiddenS : null,
    hidden_fraction: series.some((r) => r.sync_comm_s !== undefined) ? (syncS > 0 ? hiddenS / syncS : 0) : null,
    compute_utilisation: mean(window.map((r) => mean(r.compute_s) / Math.max(1e-9, r.step_s))),
    busbw_bytes_per_s: busbw,
    busbw_fraction: busbw === null ? null : (busbw * 8) / rateBits,
    wire_bytes: wireBytes,
    wire_bytes_per_step: wireBytes === null || wireBytes === undefined ? null : wireBytes / innerDone,
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

const DIRECT_SYSTEMS = ["nimble-direct", "nimble-psgd4-direct", "nimble-psgd4-auto"];
/** The ring rows the direct ones are held to: run beside them (`--parts direct`), else the matrix's. */
const RING_OF = { "nimble-direct": ["nimble-ring", "nimble"], "nimble-psgd4-direct": ["nimble-psgd4-ring", "nimble-psgd4"] };

/**
 * The direct all-reduce against the ring, per scenario that has its rows: steps/s of each
 * (uncompressed, and PowerSGD r4 with ring, direct and auto), the ratios, and what the
 * coordinator's cost model predicted for one gradient all-reduce against what it saw
 * (summary.json's `collective`: the least-waiting member's mean all-reduce time).
 */
export function directTable(results) {
  const groups = scenarios(results).filter((g) => DIRECT_SYSTEMS.some((s) => g.runs[s]));
  if (groups.length === 0) return "";
  const ok = (g, s) => (g.runs[s] && !g.runs[s].error ? g.runs[s] : null);
  const ringOf = (g, s) => RING_OF[s].find((r) => ok(g, r)) ?? RING_OF[s][0];
  const sps = (g, s) => (ok(g, s) ? fixed(ok(g, s).steps_per_s) : "—");
  const x = (g, a, b) => {
    const r = ratio(ok(g, a)?.steps_per_s, ok(g, b)?.steps_per_s);
    return r === null ? "—" : `${r.toFixed(2)}x`;
  };
  const lines = [
    "Direct (butterfly) all-reduce against the ring (`collective.algorithm`; 4 providers):",
    "",
    "| model | link | RTT | ring steps/s | direct steps/s | direct / ring | PowerSGD r4: ring | direct | auto | direct / ring | auto / ring | auto chose |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ];
  for (const g of groups) {
    const auto = ok(g, "nimble-psgd4-auto")?.collective;
    const chose = auto ? `${auto.algorithm}${auto.direct_max_bytes === null ? " (any size)" : auto.direct_max_bytes > 0 ? ` (up to ${(auto.direct_max_bytes / 1e6).toFixed(2)} MB)` : ""}` : "—";
    lines.push(
      `| ${g.model} | ${rateName(g.rate_bits)} | ${g.rtt_ms} ms | ${sps(g, ringOf(g, "nimble-direct"))} | ${sps(g, "nimble-direct")} | ${x(g, "nimble-direct", ringOf(g, "nimble-direct"))} | ${sps(g, ringOf(g, "nimble-psgd4-direct"))} | ${sps(g, "nimble-psgd4-direct")} | ${sps(g, "nimble-psgd4-auto")} | ${x(g, "nimble-psgd4-direct", ringOf(g, "nimble-psgd4-direct"))} | ${x(g, "nimble-psgd4-auto", ringOf(g, "nimble-psgd4-direct"))} | ${chose} |`,
    );
  }
  const ms = (v) => (v === null || v === undefined ? "—" : `${(v * 1000).toFixed(1)}`);
  lines.push("", "| model | RTT | system | all-reduces (ring / direct) | mean all-reduce ms, measured | gradient all-reduce | predicted ring / direct ms | model's link |", "| --- | --- | --- | --- | --- | --- | --- | --- |");
  for (const g of groups) {
    for (const s of ["nimble-ring", "nimble", "nimble-direct", "nimble-psgd4-ring", "nimble-psgd4", ...DIRECT_SYSTEMS.slice(1)]) {
      const c = ok(g, s)?.collective;
      if (!c) continue;
      const o = c.observed;
      const measured = [o.ring.count ? `ring ${ms(o.ring.mean_s)}` : null, o.direct.count ? `direct ${ms(o.direct.mean_s)}` : null].filter(Boolean).join(", ") || "—";
      const link = c.link.source === "measured" ? `rtt ${c.link.rtt_ms.toFixed(0)} ms, ${((c.link.rate_bytes_per_s * 8) / 1e6).toFixed(0)} Mbit/s${c.refined_alpha_s !== null ? `, alpha refined to ${ms(c.refined_alpha_s)} ms` : ""}` : "not measured (loopback assumed)";
      lines.push(`| ${g.model} | ${g.rtt_ms} ms | ${s} | ${o.ring.count} / ${o.direct.count} | ${measured} | ${(c.bytes / 1e6).toFixed(2)} MB: ${c.algorithm} | ${ms(c.predicted_s.ring)} / ${ms(c.predicted_s.direct)} | ${link} |`);
    }
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
  const direct = directTable(results);
  if (direct) lines.push("", direct);
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

const COLOURS = {
  nimble: "#1f77b4", "nimble-psgd1": "#2ca02c", "nimble-psgd4": "#17becf", ddp: "#d62728", "ddp-psgd4": "#ff7f0e",
  "nimble-direct": "#393b79", "nimble-psgd4-direct": "#637939", "nimble-psgd4-auto": "#8c6d31", "nimble-ring": "#6baed6", "nimble-psgd4-ring": "#9edae5",
  "diloco-h50-int8": "#9467bd", "diloco-h50-int4": "#8c564b", "diloco-h100-int8": "#e377c2", "diloco-h100-int8-f4t2": "#bcbd22",
};

/**
 * Validation loss against training time, one panel per model and RTT, for one link and RTT
 * (or a list of RTTs). Runs marked `reference` (no validation curve to speak of) are left out.
 */
export function lossChartSvg(results, rateBits = 100e6, rttMs = 0) {
  const rtts = Array.isArray(rttMs) ? rttMs : [rttMs];
  const groups = scenarios(results).filter((g) => g.rate_bits === rateBits && rtts.includes(g.rtt_ms));
  const W = 460;
  const H = 320;
  const pad = { l: 56, r: 16, t: 36, b: 44 };
  const panels = groups.map((g, i) => {
    const runs = Object.entries(g.runs).filter(([, r]) => !r.error && !r.reference && r.val_curve.length);
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
      ((title) => `<text x="${W / 2}" y="20" text-anchor="middle" font-size="${title.length > 64 ? 12 : 14}">${title}</text>`)(`${g.model}: validation loss vs training time (${rateName(rateBits)}, RTT ${rttLabel(g.rtt_ms)})`),
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
    const labelOf = (system) => (g.rtt_ms > 0 && system.startsWith("ddp") ? `${system} (RTT modelled)` : system);
    // The legend's left edge: room for the longest label (120 px as before for the matrix's names).
    const legend = Math.max(120, Math.round(6.2 * Math.max(0, ...runs.map(([system]) => labelOf(system).length)) + 20));
    runs.forEach(([system, r], j) => {
      const pts = r.val_curve.map((p) => `${sx(p.t).toFixed(1)},${sy(p.val_loss).toFixed(1)}`).join(" ");
      const colour = COLOURS[system] ?? "#555";
      parts.push(`<polyline fill="none" stroke="${colour}" stroke-width="2" points="${pts}"/>`);
      parts.push(`<rect x="${W - pad.r - legend}" y="${pad.t + 6 + j * 16}" width="10" height="10" fill="${colour}"/>`);
      parts.push(`<text x="${W - pad.r - legend + 15}" y="${pad.t + 15 + j * 16}" font-size="11">${labelOf(system)}</text>`);
    });
    parts.push("</g>");
    return parts.join("\n");
  });
  const width = Math.max(1, groups.length) * W;
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${H}" viewBox="0 0 ${width} ${H}" font-family="sans-serif">`,
    `<rect width="${width}" height="${H}" fill="white"/>`,
    ...(panels.length ? panels : [`<text x="20" y="40" font-size="14">no runs at ${rateName(rateBits)}, RTT ${rtts.join(", ")} ms</text>`]),
    "</svg>",
    "",
  ].join("\n");
}

// ---- the DiLoCo suite (bench-wan.mjs --suite diloco) ----------------------------------------

/** Whether a run is one of the suite's DiLoCo rows (not the no-communication reference). */
const isDiloco = (run) => run.strategy?.name === "diloco" && !run.reference;
const ok = (run) => (run && !run.error ? run : null);
/** RTT as written beside every figure: RTT > 0 is emulated (Nimble) or modelled (DDP). */
export function rttLabel(rttMs, system) {
  if (!(rttMs > 0)) return `${rttMs} ms`;
  return system === undefined ? `${rttMs} ms (emulated)` : system.startsWith("ddp") ? `${rttMs} ms (modelled)` : `${rttMs} ms (emulated)`;
}

/**
 * The reference a suite run is judged against: the run of `system` in the same scenario, else
 * in another scenario of the same model and link (`from` says which RTT), else null. Used for
 * figures that do not depend on latency: DDP's losses and bytes, the no-communication speed.
 */
function referenceRun(results, run, pick) {
  const same = results.runs.filter((r) => ok(r) && r.model === run.model && pick(r));
  const here = same.filter((r) => r.rate_bits === run.rate_bits && r.rtt_ms === run.rtt_ms);
  if (here.length) return { run: here[0], runs: here, from: null };
  const other = same.find((r) => r.rate_bits === run.rate_bits) ?? same[0];
  return other ? { run: other, runs: same.filter((r) => r.rate_bits === other.rate_bits && r.rtt_ms === other.rtt_ms), from: other.rtt_ms } : null;
}

/** A run's validation loss at step index `step` (a point of its curve), or null. */
const valAt = (run, step) => run?.val_curve.find((p) => p.step === step)?.val_loss ?? null;

/**
 * The DiLoCo suite's figures for one run, against the suite's DDP, Nimble PowerSGD r4 and
 * no-communication reference (results.reference names its system):
 *  - utilisation: samples/s (whole run, evaluation excluded) over the reference's samples/s
 *    with its communication taken out (compute_only_samples_per_s; the mean where the
 *    scenario ran the reference more than once, as the suite does before and after its
 *    DiLoCo rows, whose spread is given: this machine may be shared);
 *  - fewer_bytes: DDP's sync bytes per sample over this run's (wire bytes likewise);
 *  - equal samples: this run's last validation loss against DDP's at the same step (any
 *    DDP run of the suite that got there: DDP's losses do not depend on the link), else at
 *    the last step both evaluated;
 *  - time to target against DDP and PowerSGD r4 of the same scenario; where one of them did
 *    not reach the target, a lower bound (its training time over this run's time).
 */
export function dilocoFigures(results, run) {
  const refName = results.reference ?? "diloco-nocomm";
  const ref = referenceRun(results, run, (r) => r.system === refName);
  const ddpBytes = referenceRun(results, run, (r) => r.system === "ddp");
  const here = (system) => ok(results.runs.find((r) => r.system === system && r.model === run.model && r.rate_bits === run.rate_bits && r.rtt_ms === run.rtt_ms));
  const vsTime = (other) => {
    if (!other || run.time_to_target_s === null) return null;
    if (other.time_to_target_s === null) return { value: other.train_time_s / run.time_to_target_s, lower_bound: true };
    return { value: other.time_to_target_s / run.time_to_target_s, lower_bound: false };
  };
  const last = run.val_curve[run.val_curve.length - 1] ?? null;
  let equal = null;
  if (last) {
    const ddps = results.runs.filter((r) => ok(r) && r.system === "ddp" && r.model === run.model);
    ddps.sort((a, b) => (b.rtt_ms === run.rtt_ms) - (a.rtt_ms === run.rtt_ms));
    const exact = ddps.find((d) => valAt(d, last.step) !== null);
    if (exact) {
      equal = { step: last.step, val_loss: last.val_loss, ddp_val_loss: valAt(exact, last.step), ddp_rtt_ms: exact.rtt_ms, final: true };
    } else {
      // The last step both evaluated.
      const mine = new Set(run.val_curve.map((p) => p.step));
      let best = null;
      for (const d of ddps) for (const p of d.val_curve) if (mine.has(p.step) && (!best || p.step > best.step)) best = { step: p.step, ddp: d, v: p.val_loss };
      if (best) equal = { step: best.step, val_loss: valAt(run, best.step), ddp_val_loss: best.v, ddp_rtt_ms: best.ddp.rtt_ms, final: false };
    }
    if (equal) equal.relative = equal.val_loss / equal.ddp_val_loss - 1;
  }
  const refSpeeds = ref ? ref.runs.map((r) => r.compute_only_samples_per_s).filter((x) => x !== null) : [];
  const refSps = mean(refSpeeds);
  return {
    utilisation: ratio(run.samples_per_s, refSps),
    reference_rtt_ms: ref?.from ?? null,
    reference_samples_per_s: refSps,
    reference_spread: refSpeeds.length > 1 ? (Math.max(...refSpeeds) - Math.min(...refSpeeds)) / refSps : null,
    fewer_bytes: ratio(ddpBytes?.run.sync_bytes_per_sample, run.sync_bytes_per_sample),
    fewer_wire_bytes: ratio(ddpBytes?.run.wire_bytes_per_sample, run.wire_bytes_per_sample),
    vs_ddp: vsTime(here("ddp")),
    vs_psgd4: vsTime(here("nimble-psgd4")),
    equal_samples: equal,
  };
}

/** Which targets of the issue apply to a DiLoCo row: bytes only int8 at H=100 and 4 bits at H=50. */
function bytesTargetApplies(run) {
  const s = run.strategy ?? {};
  return (s.codec === "int8" && s.inner_steps === 100) || (s.codec === "int4" && s.inner_steps === 50);
}

/**
 * The issue's targets, judged for every DiLoCo row at 100 Mbit/s and RTT 100 ms (figures, not
 * assertions): each {target, system, value, met, by} where `by` says how far off a miss is.
 */
export function dilocoTargets(results) {
  const out = [];
  for (const run of results.runs) {
    if (!ok(run) || !isDiloco(run) || run.rate_bits !== 100e6 || run.rtt_ms !== 100) continue;
    const f = dilocoFigures(results, run);
    const add = (target, value, goal, fmt, lowerBound = false) => {
      if (value === null || value === undefined) {
        out.push({ target, system: run.system, value: null, met: false, by: "not measured" });
        return;
      }
      const met = value >= goal;
      out.push({ target, system: run.system, value, met, lower_bound: lowerBound, by: met ? null : fmt(value, goal) });
    };
    const times = (v, g) => `${(g / v).toFixed(2)}x short`;
    add("compute utilisation >= 95% (samples/s over the same workers' without communication)", f.utilisation, 0.95, (v, g) => `${((g - v) * 100).toFixed(1)} points short`);
    if (bytesTargetApplies(run)) add(">= 400x fewer bytes per sample than uncompressed DDP", f.fewer_bytes, 400, (v, g) => `${((1 - v / g) * 100).toFixed(1)}% short (${v.toFixed(0)}x)`);
    if (f.equal_samples) {
      const rel = f.equal_samples.relative;
      out.push({ target: `final validation loss within 2% of DDP at equal samples${f.equal_samples.final ? "" : " (at the last step both evaluated)"}`, system: run.system, value: rel, met: rel <= 0.02, by: rel <= 0.02 ? null : `${((rel - 0.02) * 100).toFixed(1)} points over` });
    } else out.push({ target: "final validation loss within 2% of DDP at equal samples", system: run.system, value: null, met: false, by: "no DDP loss at a step this run evaluated" });
    if (run.time_to_target_s === null) {
      out.push({ target: "target validation loss reached >= 5x sooner than DDP", system: run.system, value: null, met: false, by: "target not reached" });
      out.push({ target: "target validation loss reached >= 2x sooner than Nimble PowerSGD r4", system: run.system, value: null, met: false, by: "target not reached" });
    } else {
      for (const [key, goal, who] of [["vs_ddp", 5, "DDP"], ["vs_psgd4", 2, "Nimble PowerSGD r4"]]) {
        const x = f[key];
        // A lower bound (the other did not get there) that already meets the goal is a met target;
        // one that does not is undecided: say so.
        if (x && x.lower_bound && x.value < goal) out.push({ target: `target validation loss reached >= ${goal}x sooner than ${who}`, system: run.system, value: x.value, lower_bound: true, met: false, by: `undecided: ${who} stopped before the target (> ${x.value.toFixed(1)}x)` });
        else add(`target validation loss reached >= ${goal}x sooner than ${who}`, x?.value ?? null, goal, times, x?.lower_bound ?? false);
      }
    }
  }
  return out;
}

const mb = (x) => (x === null || x === undefined ? "—" : x >= 1e6 ? `${(x / 1e6).toFixed(2)} MB` : x >= 1e3 ? `${(x / 1e3).toFixed(1)} kB` : `${x.toFixed(0)} B`);

/** What compute utilisation is measured against, per scenario, with the spread of repeated reference runs. */
function referenceLines(results) {
  const name = results.reference ?? "diloco-nocomm";
  const out = [];
  for (const g of scenarios(results)) {
    const refs = results.runs.filter((r) => ok(r) && r.system === name && r.model === g.model && r.rate_bits === g.rate_bits && r.rtt_ms === g.rtt_ms);
    if (!refs.length) continue;
    const f = dilocoFigures(results, refs[0]);
    const each = refs.map((r) => r.compute_only_samples_per_s.toFixed(1)).join(", ");
    out.push(`- ${rateName(g.rate_bits)}, RTT ${rttLabel(g.rtt_ms)}: ${name} ${f.reference_samples_per_s.toFixed(1)} samples/s with its one sync taken out${refs.length > 1 ? ` (mean of ${each}: spread ${pct(f.reference_spread)})` : ""}.`);
  }
  return out.length ? ["Compute utilisation = samples/s (evaluation excluded) over the same workers' with communication switched off:", "", ...out, ""] : [];
}

/** The DiLoCo suite as markdown: one named row per run, then the targets at RTT 100 ms. */
export function dilocoMarkdown(results) {
  const lines = [
    `# WAN benchmark, DiLoCo suite (${results.date.slice(0, 10)}, ${results.machine.cpu}, ${results.machine.cores} cores, ${results.workers} providers, shaping: ${results.shaping})`,
    "",
    results.shaping_note ? `**${results.shaping_note}.**\n` : "",
    `Latency: ${results.latency}. Every RTT > 0 figure below is at an emulated RTT (Nimble) or a modelled one (DDP).`,
    "",
    results.note ? `${results.note}\n` : "",
    ...referenceLines(results),
    "| link | RTT | row | H | F / tau | codec | inner steps | samples/s | compute util. | in-run compute share | sync bytes / sample | fewer than DDP (sync / wire) | hidden | time to target | vs DDP | vs psgd4 | val loss at equal samples (step): row / DDP |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ];
  for (const run of results.runs) {
    const head = `| ${rateName(run.rate_bits)} | ${rttLabel(run.rtt_ms, run.system)} | ${run.system}`;
    if (run.error) {
      lines.push(`${head} | | | | failed: ${run.error.replace(/\|/g, "/").replace(/\n/g, " ").slice(0, 120)} | | | | | | | | | | |`);
      continue;
    }
    const s = run.strategy?.name === "diloco" ? run.strategy : null;
    const f = dilocoFigures(results, run);
    const steps = `${run.inner_steps_done}${run.capped ? ` of ${run.steps} (stopped at ${run.cap_s} s)` : ""}`;
    const util = f.utilisation === null ? "—" : `${pct(f.utilisation)}${f.reference_rtt_ms !== null && run.system !== results.reference ? ` (ref. at RTT ${f.reference_rtt_ms})` : ""}`;
    const fewer = run.reference ? "—" : run.system === "ddp" ? "1x" : `${f.fewer_bytes === null ? "—" : `${f.fewer_bytes.toFixed(0)}x`} / ${f.fewer_wire_bytes === null ? "—" : `${f.fewer_wire_bytes.toFixed(0)}x`}`;
    const hidden = run.hidden_fraction === null || run.reference ? "—" : pct(run.hidden_fraction);
    const ttt = run.reference ? "—" : run.time_to_target_s === null ? `not in ${run.inner_steps_done} steps` : `${run.time_to_target_s.toFixed(1)} s (step ${run.steps_to_target})`;
    const vs = (x, self) => (self ? "1.0x" : !x ? "—" : `${x.lower_bound ? "> " : ""}${x.value.toFixed(1)}x`);
    const e = f.equal_samples;
    const eq = run.reference ? "— (a reference for speed only)" : run.system === "ddp" ? fixed(run.final_val_loss, 3) : !e ? "—" : `${e.val_loss.toFixed(3)} / ${e.ddp_val_loss.toFixed(3)} (step ${e.step + 1}${e.final ? "" : ", not final"}): ${e.relative >= 0 ? "+" : ""}${(e.relative * 100).toFixed(1)}%`;
    lines.push(`${head} | ${s ? `${s.inner_steps}${run.reference ? " (all)" : ""}` : "—"} | ${s ? `${s.fragments} / ${s.overlap_steps}` : "—"} | ${s ? s.codec : run.system.includes("psgd") ? "PowerSGD r4" : "fp32"} | ${steps} | ${fixed(run.samples_per_s, 1)} | ${util} | ${pct(run.slowest_compute_share)} | ${mb(run.sync_bytes_per_sample)} | ${fewer} | ${hidden} | ${ttt} | ${vs(f.vs_ddp, run.system === "ddp")} | ${vs(f.vs_psgd4, run.system === "nimble-psgd4")} | ${eq} |`);
  }
  const t = dilocoTargets(results);
  if (t.length) {
    lines.push("", `Targets at 100 Mbit/s, RTT 100 ms (emulated for Nimble, modelled for DDP), target validation loss ${results.target_val_loss}:`, "", "| target | row | measured | met |", "| --- | --- | --- | --- |");
    for (const x of t) {
      const v = x.value === null ? "—" : x.target.startsWith("compute") ? pct(x.value) : x.target.startsWith("final") ? `${x.value >= 0 ? "+" : ""}${(x.value * 100).toFixed(1)}%` : `${x.lower_bound ? "> " : ""}${x.value.toFixed(x.value >= 100 ? 0 : 1)}x`;
      lines.push(`| ${x.target} | ${x.system} | ${v} | ${x.met ? "yes" : `**no**: ${x.by}`} |`);
    }
  }
  return lines.filter((l, i) => l !== "" || lines[i - 1] !== "").join("\n") + "\n";
}
