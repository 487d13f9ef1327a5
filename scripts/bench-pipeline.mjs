// Pipeline parallelism benchmark (issue 20): the char-LM example scaled up (8 blocks,
// d_model 512) split into S = 4 stages over 4 `nimble provide` processes, each capped with
// --max-memory so that no single provider can hold the model, every figure printed beside
// its reference:
//
//  0. the cap: the same config with `pipeline_stages: 1` on one capped provider must be
//     refused by the planner (exit 2); its message is recorded;
//  1. bubble fraction per stage, from the last step's timeline (summary.pipeline.timeline:
//     1 - busy / span, the span from the first event's start to the last event's end over
//     all workers), against (S-1)/(M+S-1), for M in {4, 8, 16}, GPipe and 1F1B (D = 1);
//     beside it the median over the steps from metrics.jsonl (1 - compute / the longest
//     worker's phase of that step), less exposed to one noisy step;
//  2. peak saved-activation bytes per stage (summary.pipeline.peak_saved_bytes), 1F1B over
//     GPipe, against the bound 1.1 x min(S - i, M) / M;
//  3. samples/s against the ideal: the step's samples over the slowest stage's compute time
//     (metrics' compute_ms: a stage's holders work side by side on their chains, so the
//     mean over its holders is the stage's time per step; here D = 1, one holder);
//  4. in the bench:wan namespaces (100 Mbit/s upload per host with tc tbf, RTT 50 ms from
//     `nimble provide --latency 25`: netem is missing here): samples/s, activation bytes
//     per step and final validation loss with each activation codec against none.
//     Without namespaces (not root), providers pace themselves (--link-rate), as bench:wan;
//  5. a 2:1 memory-mixed pair: 2 providers whose --max-memory leave 2:1 above a worker's
//     base (~330 MB: torch, the dataset, the planner's margin), S = 2: the layers and
//     parameters each stage got; and (not with --quick) a pair whose --max-memory are 2:1
//     themselves, where both pay the base first and the split comes out further apart.
//
// 4 workers on a 2-core machine would fight over the cores, and a stage that waits for CPU
// looks busy: every provider runs at --speed 0.25 (the testing aid: each forward/backward
// is stretched to 4x its CPU time by sleeping), so 4 workers need about one core and behave
// as 4 slower devices of their own. The machine is shared: the load average is recorded.
//
//   npm run bench:pipeline                     # everything (about 15 min here; root for namespaces)
//   npm run bench:pipeline -- --quick          # M = 8 only, codecs none and int8
//   npm run bench:pipeline -- --parts pair --merge   # run one part again into the same results
//   npm run bench:pipeline -- --render               # only rewrite pipeline.md from pipeline.json
//   options: --parts loopback,wan,pair --merge --keep (keep the configs and run folders)
//            --out DIR (default results) --steps N (loopback runs) --wan-steps N
//            --max-memory SIZE (each of the 4 providers; default 640MB) --speed F
//            --pair-memory BIG,SMALL (default 930MB,630MB) --literal-pair BIG,SMALL (1200MB,600MB)
//            --micro-batches 4,8,16
//            --codecs none,fp16,bf16,int8
//
// Writes DIR/pipeline.json (every run's figures) and DIR/pipeline.md (the tables).
import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { stringify } from "yaml";
import { arg, CLI as cli, flag, list, ROOT as root } from "./lib/args.mjs";
import { cannotMakeNamespaces, makeWan } from "./lib/netns.mjs";
import { killGroups, mean, median } from "./lib/stats.mjs";

const quick = flag("quick");
const outDir = path.resolve(root, arg("out", "results"));
const S = 4;
const steps = Number(arg("steps", "12"));
const wanSteps = Number(arg("wan-steps", quick ? "16" : "24"));
const cap = arg("max-memory", "640MB");
const speed = Number(arg("speed", "0.25"));
const pairMemory = list("pair-memory", "930MB,630MB");
const literalPair = list("literal-pair", "1200MB,600MB");
const microBatches = list("micro-batches", quick ? "8" : "4,8,16").map(Number);
const codecs = list("codecs", quick ? "none,int8" : "none,fp16,bf16,int8");
const parts = new Set(list("parts", "loopback,wan,pair"));
const keep = flag("keep");
const merge = flag("merge");
const SCHEDULES = ["gpipe", "1f1b"];
const RATE_BITS = 100e6;
const RTT_MS = 50;
const WAN_M = 8;
const RUN_TIMEOUT_S = 420;
if (!(steps >= 3)) throw new Error(`--steps: at least 3, found ${steps}`);
if (!(wanSteps >= 3)) throw new Error(`--wan-steps: at least 3, found ${wanSteps}`);
if (!(speed > 0 && speed <= 1)) throw new Error(`--speed: a fraction in (0, 1], found ${speed}`);
if (pairMemory.length !== 2) throw new Error(`--pair-memory: BIG,SMALL, found ${pairMemory.join(",")}`);
if (literalPair.length !== 2) throw new Error(`--literal-pair: BIG,SMALL, found ${literalPair.join(",")}`);
for (const m of microBatches) if (!(Number.isInteger(m) && m >= 1)) throw new Error(`--micro-batches: ${m} is not a count`);
for (const p of parts) if (!["loopback", "wan", "pair"].includes(p)) throw new Error(`--parts: unknown part ${p} (loopback, wan, pair)`);
for (const c of codecs) if (!["none", "fp16", "bf16", "int8"].includes(c)) throw new Error(`--codecs: unknown codec ${c}`);
if (!codecs.includes("none")) codecs.unshift("none"); // the reference

// The char-LM example scaled up: 8 blocks of d_model 512 (25 M parameters, 8 x 3.15 M), short
// windows so that a step stays near two seconds at --speed 0.25.
const TASK = path.join(root, "examples", "brown-charlm", "task.py");
const MODEL = { block_size: 32, d_model: 512, layers: 8, heads: 8 };
const PAIR_MODEL = { ...MODEL, layers: 12 };
const BATCH = 16;
const OPTIMIZER = { name: "adamw", lr: 0.002, weight_decay: 0.01 };

const tmp = mkdtempSync(path.join(os.tmpdir(), "nimble-bench-pipeline-"));
const children = new Set();
const log = (line) => process.stderr.write(`${line}\n`);
const r2 = (x, d = 2) => (x === null || x === undefined || !Number.isFinite(x) ? null : Math.round(x * 10 ** d) / 10 ** d);
const load = () => os.loadavg().map((x) => r2(x));
const sum = (xs) => xs.reduce((a, b) => a + b, 0);
const MB = (b) => (b === null || b === undefined ? "-" : `${(b / 1e6).toFixed(1)} MB`);
const pct = (x, d = 1) => (x === null || x === undefined ? "-" : `${(x * 100).toFixed(d)}%`);
const fx = (x, d = 2) => (x === null || x === undefined ? "-" : x.toFixed(d));

const killChildren = () => killGroups(children);
process.on("exit", () => {
  killChildren();
  if (keep) log(`kept ${tmp} (configs and run folders)`);
  else rmSync(tmp, { recursive: true, force: true });
});
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  // makeWan adds its own (namespaces); without it, still end what was started.
  process.once(sig, () => {
    killChildren();
    process.exit(128 + ({ SIGINT: 2, SIGTERM: 15, SIGHUP: 1 }[sig]));
  });
}

function python() {
  if (process.env.NIMBLE_PYTHON) return process.env.NIMBLE_PYTHON;
  const out = execFileSync(process.execPath, [cli, "env", "--json"], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
  return JSON.parse(out).python;
}

/** Spawn in its own process group (workers go with it), inside `wan`'s namespace `host` when given. */
function spawnIn(wan, host, cmd) {
  const [file, ...args] = host ? [...wan.exec(host), ...cmd] : cmd;
  const child = spawn(file, args, { detached: true, stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}

// ---- providers -----------------------------------------------------------------------------
/**
 * Start one provider per entry of `specs` ({memory, speed?, latencyMs?, linkRate?, host?}),
 * each on its own port (loopback, or 7070 on its namespace's address), and wait for their
 * `listening` events.
 */
async function startProviders(specs, wan = null, tag = "p") {
  const started = specs.map((spec, i) => {
    const token = `pipe-${tag}${i}`;
    const host = spec.host ?? null;
    const args = [process.execPath, cli, "provide", "--host", host ? host.ip : "127.0.0.1", "--port", host ? "7070" : "0", "--token", token, "--threads", "1", "--no-profile", "--json", "--python", PY, "--max-memory", spec.memory];
    if (spec.speed !== undefined && spec.speed < 1) args.push("--speed", String(spec.speed));
    if (spec.latencyMs) args.push("--latency", String(spec.latencyMs));
    if (spec.linkRate) args.push("--link-rate", spec.linkRate);
    const child = spawnIn(wan, host, args);
    let err = "";
    child.stderr.on("data", (d) => (err += d));
    return new Promise((resolve, reject) => {
      createInterface({ input: child.stdout }).on("line", (line) => {
        try {
          const e = JSON.parse(line);
          if (e.type === "listening") resolve({ child, address: e.url, token, memory: spec.memory, host });
        } catch {
          // not an event
        }
      });
      child.once("exit", (code) => reject(new Error(`provider ${tag}${i} exited (${code}) before listening: ${err.trim().split("\n").slice(-3).join(" / ")}`)));
    });
  });
  return Promise.all(started);
}

async function stopProviders(providers) {
  for (const p of providers) {
    try {
      process.kill(-p.child.pid, "SIGTERM");
    } catch {
      // gone
    }
  }
  const gone = Promise.all(providers.map((p) => (p.child.exitCode !== null || p.child.signalCode !== null ? null : new Promise((r) => p.child.once("exit", r)))));
  const late = setTimeout(() => providers.forEach((p) => {
    try {
      process.kill(-p.child.pid, "SIGKILL");
    } catch {
      // gone
    }
  }), 10_000);
  await gone;
  clearTimeout(late);
}

/** The largest resident set of any process below `pids` (the providers: their workers), sampled every 0.5 s. */
function rssSampler(pids) {
  let peak = 0;
  const sample = () => {
    let out = "";
    try {
      out = execFileSync("ps", ["-eo", "pid=,ppid=,rss="], { encoding: "utf8" });
    } catch {
      return;
    }
    const rows = out.trim().split("\n").map((l) => l.trim().split(/\s+/).map(Number));
    const kids = new Map();
    for (const [pid, ppid] of rows) kids.set(ppid, [...(kids.get(ppid) ?? []), pid]);
    const rss = new Map(rows.map(([pid, , kb]) => [pid, kb * 1024]));
    const below = [];
    const walk = (pid) => {
      for (const k of kids.get(pid) ?? []) {
        below.push(k);
        walk(k);
      }
    };
    pids.forEach(walk);
    for (const pid of below) peak = Math.max(peak, rss.get(pid) ?? 0);
  };
  const timer = setInterval(sample, 500);
  return { stop: () => (clearInterval(timer), sample(), peak) };
}

// ---- one run -------------------------------------------------------------------------------
/** `nimble train` of `config` (in `host`'s namespace when given): its exit code, error message, run folder. */
function train(name, config, wan = null, host = null, onStep = null) {
  const file = path.join(tmp, `${name}.yaml`);
  writeFileSync(file, stringify({ name, output: path.join(tmp, "runs"), ...config }));
  const child = spawnIn(wan, host, [process.execPath, cli, "train", file, "--json", "--python", PY]);
  let runDir = null;
  let error = null;
  let stderr = "";
  child.stderr.on("data", (d) => (stderr += d));
  createInterface({ input: child.stdout }).on("line", (line) => {
    try {
      const e = JSON.parse(line);
      if (e.type === "run") runDir = e.run_dir;
      if (e.type === "done") runDir = e.run_dir;
      if (e.type === "error") error = e.message;
      if (e.type === "step") onStep?.(e);
    } catch {
      // not an event
    }
  });
  const timer = setTimeout(() => {
    error = `timed out after ${RUN_TIMEOUT_S} s`;
    try {
      process.kill(-child.pid, "SIGKILL");
    } catch {
      // gone
    }
  }, RUN_TIMEOUT_S * 1000);
  return new Promise((resolve) => {
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? signal, error: error ?? (code === 0 ? null : stderr.trim().split("\n").slice(-5).join("\n")), runDir });
    });
  });
}

function readRun(runDir) {
  const summary = JSON.parse(readFileSync(path.join(runDir, "summary.json"), "utf8"));
  const metrics = readFileSync(path.join(runDir, "metrics.jsonl"), "utf8").trim().split("\n").filter(Boolean).map((l) => JSON.parse(l));
  return { summary, metrics };
}

function baseConfig({ model = MODEL, M, schedule, codec = "none", stages = S, providers, evalSamples = 64, runSteps }) {
  return {
    task: TASK,
    task_args: model,
    steps: runSteps,
    batch_size: BATCH,
    seed: 0,
    optimizer: OPTIMIZER,
    lr_schedule: { name: "constant" },
    compression: { method: "none" },
    // A run evaluates after its last step whatever `every` says: few samples, and batches no
    // larger than a step's (the planner sizes stages for the training micro-batches, not for
    // an evaluation batch: the default 256 would put every worker ~230 MB past its estimate).
    eval: { every: 0, samples: evalSamples, batch_size: BATCH },
    parallel: { pipeline_stages: stages, micro_batches: M, schedule, activation_codec: codec },
    providers: providers.map((p) => ({ address: p.address, token: p.token })),
  };
}

// ---- figures -------------------------------------------------------------------------------
/** Per stage, from one step's timeline: 1 - busy / span, the span over every worker's events. */
function timelineBubble(timeline, stages) {
  const events = timeline.workers.flatMap((w) => w.events);
  const t0 = Math.min(...events.map((e) => e[3]));
  const t1 = Math.max(...events.map((e) => e[4]));
  const span = t1 - t0;
  const perStage = [];
  for (let s = 0; s < stages; s++) {
    const holders = timeline.workers.filter((w) => w.stage === s);
    // With replicas (D > 1) each holder's own share of the span, averaged.
    const busy = mean(holders.map((w) => sum(w.events.map((e) => e[4] - e[3]))));
    perStage.push(1 - busy / span);
  }
  // What explains a gap to theory: the stages' unequal busy times (the schedule moves at the
  // slowest stage's pace, the others wait: 1 - busy_s / (busy_max x (M+S-1)/M)), and the
  // hand-off of a micro-batch between stages (the shortest gap, over the micro-batches, from
  // its F (B) ending on one stage to starting on the next (previous) one: the receiver idle).
  const at = new Map();
  for (const w of timeline.workers) for (const [k, , mb, a, b] of w.events) at.set(`${w.stage}:${k}:${mb}`, [a, b]);
  const M = Math.max(...events.map((e) => e[2])) + 1;
  const busyOf = Array.from({ length: stages }, (_, s) => (1 - perStage[s]) * span);
  const paced = (Math.max(...busyOf) * (M + stages - 1)) / M;
  const gaps = [];
  for (let s = 0; s + 1 < stages; s++) {
    for (const [from, to, k] of [[s, s + 1, "F"], [s + 1, s, "B"]]) {
      const g = [];
      for (let mb = 0; mb < M; mb++) {
        const a = at.get(`${from}:${k}:${mb}`);
        const b = at.get(`${to}:${k}:${mb}`);
        if (a && b) g.push(b[0] - a[1]);
      }
      if (g.length) gaps.push(Math.min(...g));
    }
  }
  return {
    span_s: span,
    per_stage: perStage,
    mean: mean(perStage),
    busy_s: busyOf,
    imbalance_theory_per_stage: busyOf.map((b) => 1 - b / paced),
    imbalance_theory_mean: mean(busyOf.map((b) => 1 - b / paced)),
    span_over_paced: span / paced,
    handoff_ms: median(gaps) * 1000,
  };
}

/** The steps the rate figures are taken over: all but the first two (start-up). */
const measured = (metrics) => metrics.slice(Math.min(2, Math.max(0, metrics.length - 2)));

/** Step time: wall time between step ends, less evaluation. */
function stepTimes(metrics) {
  return metrics.map((r, i) => (i === 0 ? r.step_s : r.wall_s - metrics[i - 1].wall_s) - (r.eval_s ?? 0));
}

function stageFigures(metrics, stages) {
  const times = stepTimes(metrics);
  const window = measured(metrics.map((r, i) => ({ ...r, time_s: times[i] })));
  const perStep = window.map((r) => {
    // A stage's compute per step: its holders run side by side, each on its chains, so the mean over them.
    const compute = Array.from({ length: stages }, (_, s) => mean(r.pipeline.filter((p) => p.stage === s).map((p) => p.compute_ms)) / 1000);
    const phase = Math.max(...r.pipeline.map((p) => (p.compute_ms + p.send_ms + p.bubble_ms) / 1000));
    return { samples: r.samples, time_s: r.time_s, compute, phase, act: sum(r.pipeline.map((p) => p.act_bytes_sent)) };
  });
  const samples = sum(perStep.map((x) => x.samples));
  const time = sum(perStep.map((x) => x.time_s));
  const stageCompute = Array.from({ length: stages }, (_, s) => median(perStep.map((x) => x.compute[s])));
  const slowest = Math.max(...stageCompute);
  return {
    measured_steps: perStep.length,
    samples_per_s: samples / time,
    step_s: median(perStep.map((x) => x.time_s)),
    stage_compute_s: stageCompute,
    ideal_samples_per_s: BATCH / slowest,
    bubble_median_per_stage: Array.from({ length: stages }, (_, s) => median(perStep.map((x) => 1 - x.compute[s] / x.phase))),
    act_bytes_per_step: median(perStep.map((x) => x.act)),
    send_ms: Array.from({ length: stages }, (_, s) => median(window.map((r) => mean(r.pipeline.filter((p) => p.stage === s).map((p) => p.send_ms))))),
    recv_ms: Array.from({ length: stages }, (_, s) => median(window.map((r) => mean(r.pipeline.filter((p) => p.stage === s).map((p) => p.recv_ms))))),
  };
}

const theoryBubble = (M, stages = S) => (stages - 1) / (M + stages - 1);
const memoryBound = (i, M, stages = S) => (1.1 * Math.min(stages - i, M)) / M;

function planOf(summary) {
  const plan = summary.pipeline?.plan ?? {};
  return {
    bounds: plan.bounds ?? null,
    objective: plan.objective ?? null,
    stages: (plan.stages ?? []).map((s) => ({ stage: s.index, layers: s.layers, names: s.names, n_layers: s.layers[1] - s.layers[0], params: s.params, ranks: s.ranks, estimate_bytes: s.memoryBytes, cap_bytes: s.capBytes })),
  };
}

// ---- the runs ------------------------------------------------------------------------------
if (flag("render")) {
  // Only the tables again, from DIR/pipeline.json (after a change to them): nothing runs.
  const res = JSON.parse(readFileSync(path.join(outDir, "pipeline.json"), "utf8"));
  writeFileSync(path.join(outDir, "pipeline.md"), markdown(res));
  process.stdout.write(markdown(res));
  process.exit(0);
}

const PY = python();

const results = {
  date: new Date().toISOString(),
  machine: { cpu: os.cpus()[0]?.model ?? "unknown", cores: os.cpus().length, memory_gib: Math.round(os.totalmem() / 2 ** 30), gpu: null },
  load_avg_start: load(),
  quick,
  setup: {
    task: path.relative(root, TASK),
    task_args: MODEL,
    batch_size: BATCH,
    optimizer: OPTIMIZER,
    stages: S,
    replicas: 1,
    providers: 4,
    max_memory: cap,
    torch_threads: 1,
    speed,
    speed_note: `every provider runs at --speed ${speed}: each forward/backward sleeps so it takes 1/${speed} of its CPU time, so 4 workers on ${os.cpus().length} shared cores do not wait for CPU (they behave as 4 slower devices)`,
    steps,
    wan_steps: wanSteps,
    figures_from: "the rate figures skip the first 2 steps; the timeline is the last step's",
  },
  refusal: null,
  runs: [],
  wan: { shaping: null, runs: [] },
  pairs: [],
};
mkdirSync(outDir, { recursive: true });
if (merge) {
  // Only the parts run now are replaced; the rest stays as the earlier run left it.
  let before = null;
  try {
    before = JSON.parse(readFileSync(path.join(outDir, "pipeline.json"), "utf8"));
  } catch {
    // nothing to merge into
  }
  if (before) {
    const rerun = { parts: [...parts], date: results.date, load_avg_start: results.load_avg_start };
    if (!parts.has("loopback")) Object.assign(results, { refusal: before.refusal, runs: before.runs });
    if (!parts.has("wan")) results.wan = before.wan;
    if (!parts.has("pair")) results.pairs = before.pairs;
    Object.assign(results, { date: before.date, load_avg_start: before.load_avg_start, load_avg_end: before.load_avg_end, total_min: before.total_min, setup: before.setup, reruns: [...(before.reruns ?? []), rerun] });
  }
}
const save = () => {
  writeFileSync(path.join(outDir, "pipeline.json"), JSON.stringify(results, null, 2) + "\n");
  writeFileSync(path.join(outDir, "pipeline.md"), markdown(results));
};

const t0 = Date.now();
const minutes = () => ((Date.now() - t0) / 60000).toFixed(1);
let wan = null;
let providers = [];

try {
  // ---- 0-3: loopback, 4 capped providers ------------------------------------------------------
  if (parts.has("loopback")) {
    log(`bench:pipeline: 4 providers, --max-memory ${cap} each, --speed ${speed}, 1 torch thread; load ${load().join(" ")}`);
    providers = await startProviders(Array.from({ length: 4 }, () => ({ memory: cap, speed })));
    try {
      const refM = Math.max(...microBatches);
      log(`[refusal] the same model with pipeline_stages: 1 (1f1b, M = ${refM}: the least a single worker could hold) on one provider of ${cap}`);
      const ref = await train("pipe-single", baseConfig({ M: refM, schedule: "1f1b", stages: 1, providers: providers.slice(0, 1), runSteps: steps }));
      const needs = /needs at least ([0-9.]+ [kMGT]?B)/.exec(ref.error ?? "")?.[1] ?? null;
      results.refusal = { config: { pipeline_stages: 1, micro_batches: refM, schedule: "1f1b", providers: 1, max_memory: cap }, exit_code: ref.code, refused: ref.code === 2, needs, message: ref.error };
      log(`  exit ${ref.code}${ref.code === 2 ? " (refused, as it must be)" : " (NOT refused: the cap does not forbid a single-provider run)"}: ${(ref.error ?? "").split("\n").slice(-1)[0]}`);
      save();

      for (const M of microBatches) {
        for (const schedule of SCHEDULES) {
          const name = `pipe-${schedule}-m${M}`;
          log(`[${name}] S = ${S}, M = ${M}, ${schedule}, ${steps} steps (${minutes()} min so far; load ${load()[0]})`);
          const rss = rssSampler(providers.map((p) => p.child.pid));
          const loadAt = load()[0];
          const started = Date.now();
          const out = await train(name, baseConfig({ M, schedule, providers, runSteps: steps }));
          const peakRss = rss.stop();
          if (out.code !== 0 || !out.runDir) {
            log(`  failed (exit ${out.code}): ${out.error}`);
            results.runs.push({ name, M, schedule, error: out.error, exit_code: out.code });
            save();
            continue;
          }
          const { summary, metrics } = readRun(out.runDir);
          const tl = timelineBubble(summary.pipeline.timeline, S);
          const fig = stageFigures(metrics, S);
          const run = {
            name, M, schedule, steps, load_avg_1min: loadAt, wall_s: r2((Date.now() - started) / 1000, 1),
            plan: planOf(summary),
            timeline_step: summary.pipeline.timeline.step,
            bubble: {
              theory: theoryBubble(M), timeline_per_stage: tl.per_stage, timeline_mean: tl.mean, span_s: tl.span_s, busy_s: tl.busy_s,
              imbalance_theory_per_stage: tl.imbalance_theory_per_stage, imbalance_theory_mean: tl.imbalance_theory_mean, span_over_paced: tl.span_over_paced, handoff_ms: tl.handoff_ms,
              median_per_stage: fig.bubble_median_per_stage, median_mean: mean(fig.bubble_median_per_stage),
            },
            peak_saved_bytes: summary.pipeline.peak_saved_bytes,
            peak_worker_rss_bytes: peakRss,
            throughput: { samples_per_s: fig.samples_per_s, ideal_samples_per_s: fig.ideal_samples_per_s, step_s: fig.step_s, stage_compute_s: fig.stage_compute_s, send_ms: fig.send_ms, recv_ms: fig.recv_ms, measured_steps: fig.measured_steps },
            act_bytes_per_step: fig.act_bytes_per_step,
            final_loss: summary.final_loss,
            timeline: summary.pipeline.timeline,
          };
          results.runs.push(run);
          const rel = (tl.mean - run.bubble.theory) / run.bubble.theory;
          log(`  bubble ${pct(tl.mean)} (stages ${tl.per_stage.map((b) => pct(b, 0)).join(" ")}) vs theory ${pct(run.bubble.theory)} (${rel >= 0 ? "+" : ""}${pct(rel, 0)} relative); with the stages' measured busy times ${pct(tl.imbalance_theory_mean)}; hand-off ${fx(tl.handoff_ms, 1)} ms; median over steps ${pct(run.bubble.median_mean)}`);
          log(`  ${fx(fig.samples_per_s)} samples/s vs ideal ${fx(fig.ideal_samples_per_s)} (${pct(fig.samples_per_s / fig.ideal_samples_per_s, 0)}; 1 - theory bubble ${pct(1 - run.bubble.theory, 0)}); peak saved ${run.peak_saved_bytes.map(MB).join(", ")}; worker RSS peak ${MB(peakRss)} of ${cap}`);
          save();
        }
      }
    } finally {
      await stopProviders(providers);
    }
  }

  // ---- 4: activation codecs over shaped links ------------------------------------------------
  if (parts.has("wan")) {
    const whyNot = cannotMakeNamespaces();
    results.wan.shaping = whyNot ? "transport" : "netns+tbf";
    results.wan.rate_bits = RATE_BITS;
    results.wan.rtt_ms = RTT_MS;
    results.wan.latency = `one-way ${RTT_MS / 2} ms added by each provider to what it receives (nimble provide --latency: netem is missing here)`;
    if (whyNot) {
      results.wan.shaping_note = `no namespaces (${whyNot}): each provider paces its own uploads (--link-rate 100Mbit) on loopback, as bench:wan falls back`;
      log(`bench:pipeline: cannot make network namespaces (${whyNot}): pacing inside Nimble's transport instead (--link-rate 100Mbit) on loopback`);
    }
    wan = whyNot ? null : makeWan(["c", "p0", "p1", "p2", "p3"], { prefix: "npipe-" });
    const coord = wan?.hosts[0] ?? null;
    const hosts = wan ? wan.hosts.slice(1) : [null, null, null, null];
    wan?.shape(RATE_BITS, wan.hosts);
    providers = await startProviders(hosts.map((host) => ({ memory: cap, speed, latencyMs: RTT_MS / 2, host, ...(host ? {} : { linkRate: `${RATE_BITS / 1e6}Mbit` }) })), wan, "w");
    try {
      for (const codec of codecs) {
        const name = `pipe-wan-${codec}`;
        log(`[${name}] 1f1b, M = ${WAN_M}, activation_codec ${codec}, 100 Mbit/s, RTT ${RTT_MS} ms, ${wanSteps} steps (${minutes()} min so far; load ${load()[0]})`);
        // The providers' wire bytes over the measured steps: from the end of step 2 to the end of the
        // last but one (the last step's event comes after the final evaluation).
        const tx = () => (wan ? sum(hosts.map((h) => wan.txBytes(h))) : null);
        const marks = new Map();
        const onStep = (e) => {
          const done = Number(e.step ?? e.steps_done ?? NaN);
          if (Number.isFinite(done)) marks.set(done, tx());
        };
        const loadAt = load()[0];
        const started = Date.now();
        const out = await train(name, baseConfig({ M: WAN_M, schedule: "1f1b", codec, providers, evalSamples: 512, runSteps: wanSteps }), wan, coord, onStep);
        if (out.code !== 0 || !out.runDir) {
          log(`  failed (exit ${out.code}): ${out.error}`);
          results.wan.runs.push({ name, codec, error: out.error, exit_code: out.code });
          save();
          continue;
        }
        const seen = [...marks.keys()].sort((a, b) => a - b);
        const from = seen.find((k) => k >= seen[0] + 1);
        const to = seen.filter((k) => k < wanSteps).pop();
        const wirePerStep = wan && from !== undefined && to > from ? (marks.get(to) - marks.get(from)) / (to - from) : null;
        const { summary, metrics } = readRun(out.runDir);
        const fig = stageFigures(metrics, S);
        const run = {
          name, codec, M: WAN_M, schedule: "1f1b", steps: wanSteps, load_avg_1min: loadAt, wall_s: r2((Date.now() - started) / 1000, 1),
          samples_per_s: fig.samples_per_s, ideal_samples_per_s: fig.ideal_samples_per_s, step_s: fig.step_s,
          act_bytes_per_step: fig.act_bytes_per_step,
          wire_bytes_per_step: wirePerStep,
          send_ms: fig.send_ms, recv_ms: fig.recv_ms,
          final_loss: summary.final_loss,
          final_val_loss: summary.eval?.loss ?? null,
          bubble_timeline: timelineBubble(summary.pipeline.timeline, S),
        };
        results.wan.runs.push(run);
        const none = results.wan.runs.find((r) => r.codec === "none" && !r.error);
        log(`  ${fx(run.samples_per_s)} samples/s, ${MB(run.act_bytes_per_step)} activations/step${none && codec !== "none" ? ` (${fx(none.act_bytes_per_step / run.act_bytes_per_step)}x fewer than none)` : ""}, ${MB(run.wire_bytes_per_step)}/step on the wire, final val loss ${fx(run.final_val_loss, 4)}${none && codec !== "none" ? ` (${run.final_val_loss >= none.final_val_loss ? "+" : ""}${pct(run.final_val_loss / none.final_val_loss - 1, 2)} vs none)` : ""}`);
        save();
      }
    } finally {
      await stopProviders(providers);
      wan?.close();
      wan = null;
    }
  }

  // ---- 5: a 2:1 memory-mixed pair --------------------------------------------------------------
  if (parts.has("pair")) {
    // The headline pair leaves 2:1 above a worker's base; the literal pair (not with --quick)
    // has --max-memory itself 2:1, to show what the base does to the split.
    const pairs = [{ kind: "2:1 above the base", memory: pairMemory }, ...(quick ? [] : [{ kind: "2:1 caps", memory: literalPair }])];
    results.pairs = [];
    for (const [k, pair] of pairs.entries()) {
      log(`[pair ${pair.kind}] 2 providers of --max-memory ${pair.memory.join(" and ")}, S = 2, 1f1b, M = 8, ${PAIR_MODEL.layers} blocks (${minutes()} min so far)`);
      providers = await startProviders(pair.memory.map((memory) => ({ memory })), null, `m${k}`);
      try {
        const rss = rssSampler(providers.map((p) => p.child.pid));
        const out = await train(`pipe-pair${k}`, baseConfig({ model: PAIR_MODEL, M: 8, schedule: "1f1b", stages: 2, providers, runSteps: 4 }));
        const peakRss = rss.stop();
        if (out.code !== 0 || !out.runDir) {
          log(`  failed (exit ${out.code}): ${out.error}`);
          results.pairs.push({ ...pair, error: out.error, exit_code: out.code });
        } else {
          const { summary } = readRun(out.runDir);
          const plan = planOf(summary);
          // Which provider (its --max-memory) holds which stage, by the workers' provider addresses.
          const memOf = new Map(providers.map((p) => [p.address, p.memory]));
          const rankMem = new Map(summary.workers.map((w) => [w.rank, memOf.get(w.provider) ?? "?"]));
          const stages = plan.stages.map((s) => ({ ...s, max_memory: s.ranks.map((r) => rankMem.get(r)).join(",") }));
          const big = stages.find((s) => s.max_memory === pair.memory[0]);
          const small = stages.find((s) => s.max_memory === pair.memory[1]);
          const row = {
            ...pair,
            task_args: PAIR_MODEL,
            stages,
            params_ratio: big && small ? big.params / small.params : null,
            layers_ratio: big && small ? big.n_layers / small.n_layers : null,
            peak_worker_rss_bytes: peakRss,
            final_loss: summary.final_loss,
            why: summary.pipeline.why,
          };
          results.pairs.push(row);
          log(`  ${stages.map((s) => `stage ${s.stage} (${s.max_memory}): layers ${s.layers[0]}-${s.layers[1] - 1} (${s.names.join(" .. ")}), ${(s.params / 1e6).toFixed(2)} M params, estimate ${MB(s.estimate_bytes)}`).join("; ")}: params ${fx(row.params_ratio)}:1${k === 0 ? " (target about 2:1)" : ""}; worker RSS peak ${MB(peakRss)}`);
        }
        save();
      } finally {
        await stopProviders(providers);
      }
    }
  }

} finally {
  killChildren();
  wan?.close();
}
const ended = { total_min: Math.round((Date.now() - t0) / 6000) / 10, load_avg_end: load() };
Object.assign(merge && results.reruns?.length ? results.reruns[results.reruns.length - 1] : results, ended);
save();
process.stdout.write(markdown(results));
log(`wrote ${path.relative(root, path.join(outDir, "pipeline.json"))} and pipeline.md (${minutes()} min)`);

// ---- the tables ----------------------------------------------------------------------------
/** The issue's targets, each met or missed, from the figures. */
function targets(res) {
  const L = ["## Targets", ""];
  const runs = res.runs.filter((r) => !r.error);
  if (runs.length) {
    const within = runs.filter((r) => Math.abs(r.bubble.timeline_mean / r.bubble.theory - 1) <= 0.1);
    L.push(`- Bubble within 10% (relative) of (S-1)/(M+S-1): ${within.length} of ${runs.length} runs (${runs.map((r) => `${r.schedule} M=${r.M} ${r.bubble.timeline_mean >= r.bubble.theory ? "+" : ""}${pct(r.bubble.timeline_mean / r.bubble.theory - 1, 0)}`).join(", ")}).`);
    let n = 0;
    let inBound = 0;
    for (const f of runs.filter((r) => r.schedule === "1f1b")) {
      const g = runs.find((r) => r.schedule === "gpipe" && r.M === f.M);
      if (!g) continue;
      for (let i = 0; i < S; i++) {
        n += 1;
        if (f.peak_saved_bytes[i] / g.peak_saved_bytes[i] <= memoryBound(i, f.M)) inBound += 1;
      }
    }
    if (n) L.push(`- 1F1B peak saved bytes within 1.1 x min(S-i, M)/M of GPipe's: ${inBound} of ${n} stage x M pairs.`);
  }
  const wr = (res.wan?.runs ?? []).filter((r) => !r.error);
  const none = wr.find((r) => r.codec === "none");
  const int8 = wr.find((r) => r.codec === "int8");
  if (none && int8) {
    const dl = int8.final_val_loss / none.final_val_loss - 1;
    L.push(`- int8 activations: final validation loss ${dl >= 0 ? "+" : ""}${pct(dl, 2)} against none (target <= +1%: ${dl <= 0.01 ? "met" : "**missed**"}) at ${fx(none.act_bytes_per_step / int8.act_bytes_per_step)}x fewer activation bytes (4x less one float32 scale per 256 values).`);
  }
  const p = res.pairs?.[0];
  if (p && !p.error) L.push(`- Memory-mixed pair: params ${fx(p.params_ratio)}:1 (target about 2:1: ${p.params_ratio >= 1.7 && p.params_ratio <= 2.3 ? "met" : "**missed**"}).`);
  if (res.refusal) L.push(`- One capped provider refused with exit 2: ${res.refusal.refused ? "yes" : "**no**"}.`);
  L.push("");
  return L;
}

function markdown(res) {
  const L = [];
  const ok = (b) => (b ? "met" : "**missed**");
  L.push(`# Pipeline parallelism benchmark`);
  L.push("");
  L.push(`${res.date.slice(0, 10)}, ${res.machine.cores}-core ${res.machine.cpu}, no GPU; load average ${res.load_avg_start.join(" / ")} at the start${res.load_avg_end ? `, ${res.load_avg_end.join(" / ")} at the end` : ""}${res.total_min ? `; ${res.total_min} min` : ""}.`);
  for (const r of res.reruns ?? []) L.push(`Run again (${r.parts.join(", ")}): ${r.date.slice(0, 16).replace("T", " ")} UTC, load average ${r.load_avg_start.join(" / ")}${r.load_avg_end ? ` to ${r.load_avg_end.join(" / ")}` : ""}${r.total_min ? `, ${r.total_min} min` : ""}.`);
  const s = res.setup;
  L.push(`Char-LM (${s.task}, ${JSON.stringify(s.task_args)}), batch ${s.batch_size}, adamw; S = ${s.stages} stages x D = 1 over 4 local \`nimble provide\` processes, --max-memory ${s.max_memory} each, 1 torch thread per worker, --speed ${s.speed} (${s.speed_note.split(": ")[1]}). ${s.steps} steps a run (${s.figures_from}).`);
  L.push("");
  if (res.refusal) {
    const r = res.refusal;
    L.push(`**The cap forbids one provider:** the same model with \`pipeline_stages: 1\` (1f1b, M = ${r.config.micro_batches}) on one ${r.config.max_memory} provider: exit ${r.exit_code} (${r.refused ? "refused, as required" : "**not refused**"}).`);
    L.push("");
    L.push("```");
    L.push(String(r.message ?? "").split("\n").filter((l) => l.trim()).map((l) => l.trim()).join("\n"));
    L.push("```");
    L.push("");
  }
  const runs = res.runs.filter((r) => !r.error);
  if (runs.length) {
    L.push(`## 1. Bubble fraction (last step's timeline) against (S-1)/(M+S-1)`);
    L.push("");
    L.push(`| schedule | M | theory | measured mean | stage 0 | stage 1 | stage 2 | stage 3 | relative error | within 10% | theory at the stages' busy times | span / paced span | hand-off | median over steps (metrics) | load |`);
    L.push(`| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |`);
    for (const r of runs) {
      const b = r.bubble;
      const rel = (b.timeline_mean - b.theory) / b.theory;
      L.push(`| ${r.schedule} | ${r.M} | ${pct(b.theory)} | ${pct(b.timeline_mean)} | ${b.timeline_per_stage.map((x) => pct(x)).join(" | ")} | ${rel >= 0 ? "+" : ""}${pct(rel, 0)} (${(b.timeline_mean - b.theory) >= 0 ? "+" : ""}${((b.timeline_mean - b.theory) * 100).toFixed(1)} pts) | ${ok(Math.abs(rel) <= 0.1)} | ${pct(b.imbalance_theory_mean)} | ${fx(b.span_over_paced, 3)} | ${fx(b.handoff_ms, 1)} ms | ${pct(b.median_mean)} | ${fx(r.load_avg_1min)} |`);
    }
    L.push("");
    L.push("Theory at the stages' busy times: 1 - busy_s / (busy_max x (M+S-1)/M), the bubble the schedule would have with no hand-off cost but this step's unequal stages (the slowest one paces the rest). Span / paced span: the step's span over that paced span (1 = nothing lost between stages). Hand-off: the median over the stage boundaries of the shortest gap between a micro-batch leaving one stage and starting on the next.");
    L.push("");
    L.push(`## 2. Peak saved-activation bytes per stage: 1F1B against GPipe`);
    L.push("");
    L.push(`| M | stage | GPipe | 1F1B | 1F1B / GPipe | bound 1.1 x min(S-i, M)/M | within | largest worker RSS, any stage (GPipe / 1F1B) |`);
    L.push(`| --- | --- | --- | --- | --- | --- | --- | --- |`);
    for (const M of [...new Set(runs.map((r) => r.M))]) {
      const g = runs.find((r) => r.M === M && r.schedule === "gpipe");
      const f = runs.find((r) => r.M === M && r.schedule === "1f1b");
      if (!g || !f) continue;
      for (let i = 0; i < S; i++) {
        const ratio = f.peak_saved_bytes[i] / g.peak_saved_bytes[i];
        const bound = memoryBound(i, M);
        L.push(`| ${M} | ${i} | ${MB(g.peak_saved_bytes[i])} | ${MB(f.peak_saved_bytes[i])} | ${fx(ratio, 3)} | ${fx(bound, 3)} | ${ratio <= bound ? "yes" : "**no**"} | ${i === 0 ? `${MB(g.peak_worker_rss_bytes)} / ${MB(f.peak_worker_rss_bytes)}` : ""} |`);
      }
    }
    L.push("");
    L.push(`## 3. Samples/s against the ideal (the slowest stage's compute alone)`);
    L.push("");
    L.push(`| schedule | M | samples/s | ideal | measured / ideal | 1 - theory bubble | stage compute s/step (0..3) | step s | last step's schedule span s |`);
    L.push(`| --- | --- | --- | --- | --- | --- | --- | --- | --- |`);
    for (const r of runs) {
      const t = r.throughput;
      L.push(`| ${r.schedule} | ${r.M} | ${fx(t.samples_per_s)} | ${fx(t.ideal_samples_per_s)} | ${pct(t.samples_per_s / t.ideal_samples_per_s, 0)} | ${pct(1 - r.bubble.theory, 0)} | ${t.stage_compute_s.map((x) => fx(x)).join(" / ")} | ${fx(t.step_s)} | ${fx(r.bubble.span_s)} |`);
    }
    L.push("");
    L.push("Ideal: the step's samples over the slowest stage's forward+backward time per step (metrics' compute_ms, median over the measured steps; a stage's holders run side by side, so the mean over them, here one). A step also spends, outside the schedule's span, the loss and gradient-norm all-reduces, the update and the coordinator's round trip.");
    L.push("");
    const pl = runs[0].plan;
    L.push(`Plan (${pl.objective} objective): ${pl.stages.map((st) => `stage ${st.stage} ${st.names.join("..")} (${(st.params / 1e6).toFixed(2)} M params, est. ${MB(st.estimate_bytes)})`).join("; ")}.`);
    L.push("");
  }
  for (const r of res.runs.filter((x) => x.error)) L.push(`- ${r.name} failed (exit ${r.exit_code}): ${r.error}`);
  const w = res.wan;
  const wr = (w.runs ?? []).filter((r) => !r.error);
  if (wr.length) {
    L.push(`## 4. Activation codecs at 100 Mbit/s upload per host, RTT ${w.rtt_ms} ms (1f1b, M = ${WAN_M}, ${wr[0].steps} steps)`);
    L.push("");
    L.push(`Shaping: ${w.shaping === "netns+tbf" ? "each host in its own network namespace, upload shaped with tc tbf (the bench:wan namespaces)" : `**${w.shaping_note}**`}; latency: ${w.latency}.`);
    L.push("");
    const none = wr.find((r) => r.codec === "none");
    L.push(`| codec | samples/s | vs none | activation bytes/step | none / codec | wire bytes/step | final val loss | vs none | target |`);
    L.push(`| --- | --- | --- | --- | --- | --- | --- | --- | --- |`);
    for (const r of wr) {
      const dl = none ? r.final_val_loss / none.final_val_loss - 1 : null;
      const fewer = none ? none.act_bytes_per_step / r.act_bytes_per_step : null;
      const target = r.codec === "int8" && none ? `${ok(dl <= 0.01)} (<= 1% loss at ${fx(fewer)}x fewer bytes)` : "";
      L.push(`| ${r.codec} | ${fx(r.samples_per_s)} | ${none ? fx(r.samples_per_s / none.samples_per_s) : "-"} | ${MB(r.act_bytes_per_step)} | ${fx(fewer)}x | ${MB(r.wire_bytes_per_step)} | ${fx(r.final_val_loss, 4)} | ${dl === null ? "-" : `${dl >= 0 ? "+" : ""}${pct(dl, 2)}`} | ${target} |`);
    }
    L.push("");
  }
  for (const r of (w.runs ?? []).filter((x) => x.error)) L.push(`- ${r.name} failed (exit ${r.exit_code}): ${r.error}`);
  if (res.pairs?.length) {
    L.push(`## 5. A memory-mixed pair (S = 2, 1f1b, M = 8, ${JSON.stringify(res.pairs[0].task_args ?? PAIR_MODEL)})`);
    L.push("");
    L.push(`| pair | stage | --max-memory | layers | params | planner estimate | estimate / cap | params big : small | largest worker RSS |`);
    L.push(`| --- | --- | --- | --- | --- | --- | --- | --- | --- |`);
    for (const p of res.pairs) {
      if (p.error) {
        L.push(`| ${p.kind} (${p.memory.join(", ")}) | failed: ${p.error} | | | | | | | |`);
        continue;
      }
      for (const [j, st] of p.stages.entries()) {
        L.push(`| ${j === 0 ? p.kind : ""} | ${st.stage} | ${st.max_memory} | ${st.n_layers} (${st.names.join(" .. ")}) | ${(st.params / 1e6).toFixed(2)} M | ${MB(st.estimate_bytes)} | ${pct(st.estimate_bytes / st.cap_bytes, 0)} | ${j === 0 ? `${fx(p.params_ratio)}:1 (layers ${fx(p.layers_ratio)}:1)` : ""} | ${j === 0 ? MB(p.peak_worker_rss_bytes) : ""} |`);
      }
    }
    L.push("");
  }
  L.push(...targets(res));
  return L.join("\n") + "\n";
}
