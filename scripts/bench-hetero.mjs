// Heterogeneous providers: three local `nimble provide` processes slowed to 1 : 0.5 : 0.25 of
// their speed (the providers' --speed-file testing aid), training the MNIST example.
//   (a) equal shares, (b) capability-weighted shares (measured, self-correcting), against
//   (c) the ideal: the sum of each provider's standalone throughput.
// Then provider 0 is slowed to 0.25 mid-run, under sync and under DiLoCo: steps until
// throughput is back within 10% of the new ideal, and what it settles at. And DiLoCo
// (strategy diloco, H = --inner-steps): (d) equal shares and (e) measured shares, whose inner
// steps then take about the same time on every provider. Prints a table and writes JSON.
//
//   npm run bench:hetero [-- --steps 40 --batch 1024 --inner-steps 4 --out results/hetero.json]
//   npm run bench:hetero -- --only diloco      # the standalone runs and the DiLoCo cases
//   npm run bench:hetero -- --only slowdown --repeat 3 [--before DIR] [--md results/hetero-slowdown.md]
//       # the slowdown alone, sync and DiLoCo, each repeat with its own standalone runs;
//       # --before: another checkout (built) whose coordinator runs alternately with this one's
//   npm run bench:hetero -- --only slowdown --reanalyse results/hetero-slowdown.json   # figures again from its curves
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { stringify } from "yaml";
import { arg, CLI as cli, ROOT as root } from "./lib/args.mjs";
import { mean, median } from "./lib/stats.mjs";

const steps = Number(arg("steps", "40"));
// Large enough that compute, not per-step fixed costs, dominates a step on a CPU.
const batch = Number(arg("batch", "1024"));
const only = arg("only", null);
const out = path.resolve(root, arg("out", only === "slowdown" ? "results/hetero-slowdown.json" : "results/hetero.json"));
const md = arg("md", null);
const innerSteps = Number(arg("inner-steps", "4"));
const repeat = Number(arg("repeat", "1"));
const standaloneSteps = Number(arg("standalone-steps", String(steps)));
const before = arg("before", null);
/** A JSON of an earlier `--only slowdown` run: its figures again from its curves (no runs). */
const reanalyse = arg("reanalyse", null);
const beforeCli = before ? path.resolve(before, "dist", "cli.js") : null;
if (beforeCli && !existsSync(beforeCli)) throw new Error(`--before ${before}: no ${beforeCli} (build it first)`);
/** DiLoCo rounds of `innerSteps` inner steps, twice the steps (a line a round), int8 pseudo-gradients. */
const DILOCO = { strategy: { name: "diloco", inner_steps: innerSteps, codec: "int8" }, steps: Math.ceil((2 * steps) / innerSteps) * innerSteps };
const WARMUP_ROUNDS = 2;
const SPEEDS = [1, 0.5, 0.25];
const SLOW = 0.25; // provider 0's speed after the change
const WARMUP = 8; // steps left out of throughput figures (worker start, first rebalancing)
/** Metrics lines a recovery window spans (sync: steps; diloco: rounds), and the lines "settled" is the mean of. */
const WINDOW = { sync: 3, diloco: 2 };
const SETTLED = { sync: 10, diloco: 5 };
const tmp = mkdtempSync(path.join(os.tmpdir(), "nimble-bench-hetero-"));
const children = [];
const load = () => Number(os.loadavg()[0].toFixed(2));
for (const signal of ["SIGINT", "SIGTERM"]) {
  process.once(signal, () => {
    for (const c of children) c.kill("SIGTERM");
    rmSync(tmp, { recursive: true, force: true });
    process.exit(130);
  });
}

function startProvider(i) {
  const speedFile = path.join(tmp, `speed-${i}`);
  writeFileSync(speedFile, String(SPEEDS[i]));
  const token = `hetero-${i}`;
  const child = spawn(
    process.execPath,
    [cli, "provide", "--host", "127.0.0.1", "--port", "0", "--token", token, "--json", "--no-profile", "--threads", "1", "--speed-file", speedFile],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  children.push(child);
  return new Promise((resolve, reject) => {
    createInterface({ input: child.stdout }).on("line", (line) => {
      try {
        const e = JSON.parse(line);
        if (e.type === "listening") resolve({ address: e.url, token, speedFile });
      } catch {
        // not an event
      }
    });
    child.once("exit", (code) => reject(new Error(`provider ${i} exited (${code})`)));
  });
}

/**
 * One `nimble train` run (`coordinator`: the CLI that runs it); `onStep(step)` may act
 * mid-run. Returns its metrics lines: samples/s (evaluation time left out), shares and each
 * worker's figures.
 */
function train(name, providers, balance, { onStep = () => {}, extra = {}, coordinator = cli, trainSteps = steps } = {}) {
  const config = {
    name,
    task: path.join(root, "examples", "mnist", "task.py"),
    steps: trainSteps,
    batch_size: batch,
    optimizer: { name: "adam", lr: 0.002 },
    balance,
    eval: { every: 0, samples: 500, batch_size: 500 },
    providers: providers.map((p) => ({ address: p.address, token: p.token })),
    output: path.join(tmp, "runs"),
    ...extra,
  };
  const file = path.join(tmp, `${name}.yaml`);
  writeFileSync(file, stringify(config));
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [coordinator, "train", file, "--json"], { stdio: ["ignore", "pipe", "inherit"] });
    children.push(child);
    let runDir = "";
    createInterface({ input: child.stdout }).on("line", (line) => {
      const e = JSON.parse(line);
      if (e.type === "step") onStep(e.step);
      if (e.type === "done") runDir = e.run_dir;
    });
    child.once("exit", (code) => {
      if (code !== 0 || !runDir) return reject(new Error(`${name}: nimble train exited ${code}`));
      const lines = readFileSync(path.join(runDir, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l));
      resolve(
        lines.map((l) => ({
          step: l.step,
          // A DiLoCo line covers a round of inner steps.
          first: l.diloco ? l.step - l.diloco.inner_steps + 1 : l.step,
          rate: l.samples / (l.step_s - (l.eval_s ?? 0)),
          step_s: l.step_s - (l.eval_s ?? 0),
          shares: l.workers.map((w) => w.share),
          workers: l.workers.map((w) => ({ samples: w.samples, forward_backward_s: w.forward_backward_s, compute_s: w.compute_s, idle_s: w.idle_s })),
        })),
      );
    });
  });
}

const steady = (curve) => mean(curve.slice(WARMUP).map((s) => s.rate));
const steadyRounds = (curve) => mean(curve.slice(WARMUP_ROUNDS).map((s) => s.rate));
const speedTo = async (p, speed) => {
  writeFileSync(p.speedFile, String(speed));
  await new Promise((r) => setTimeout(r, 1200)); // the speed file is re-read every 0.5 s
};

/** Each provider's standalone samples/s at SPEEDS, and provider 0's at SLOW. */
async function standalones(providers, tag = "") {
  const alone = [];
  for (let i = 0; i < providers.length; i++) alone.push(steady(await train(`alone-${i}${tag}`, [providers[i]], "equal", { trainSteps: standaloneSteps })));
  await speedTo(providers[0], SLOW);
  const slow = steady(await train(`alone-0-slow${tag}`, [providers[0]], "equal", { trainSteps: standaloneSteps }));
  await speedTo(providers[0], SPEEDS[0]);
  return { alone, slow, ideal: alone.reduce((a, b) => a + b, 0), newIdeal: slow + alone.slice(1).reduce((a, b) => a + b, 0) };
}

/**
 * Of a step's (or round's) metrics line: the compute time the slowest worker spent beyond an
 * even spread of the work at the rates the workers showed in it (each forward/backward's
 * samples / seconds): what a perfect split would have saved, the rest of the step being
 * fixed costs (the optimizer, the all-reduce, the coordinator's round trip).
 */
function imbalanceS(line) {
  const ws = line.workers.filter((w) => w.samples > 0 && w.forward_backward_s > 0);
  if (ws.length === 0) return 0;
  const total = ws.reduce((a, w) => a + w.samples, 0);
  const rate = ws.reduce((a, w) => a + w.samples / w.forward_backward_s, 0);
  return Math.max(0, Math.max(...ws.map((w) => w.forward_backward_s)) - total / rate);
}

/**
 * Provider 0 slowed from 1 to SLOW at step `changeAt` of a `kind` (sync or diloco) run with
 * measured shares, coordinated by `coordinator`; against `ideal` (standalone figures).
 */
async function slowdown(name, providers, kind, ideal, coordinator = cli) {
  const total = kind === "diloco" ? DILOCO.steps : steps;
  const changeAt = Math.floor(total / 2);
  let changed = false;
  const loadBefore = load();
  const curve = await train(name, providers, "measured", {
    coordinator,
    extra: kind === "diloco" ? DILOCO : {},
    // `step` events count the steps done: slowed once steps 0 .. changeAt-1 are done.
    onStep: (step) => {
      if (!changed && step >= changeAt) {
        changed = true;
        writeFileSync(providers[0].speedFile, String(SLOW));
      }
    },
  });
  await speedTo(providers[0], SPEEDS[0]);
  return { name, kind, load_before: loadBefore, load_after: load(), ...analyseSlowdown(curve, kind, changeAt, ideal) };
}

/**
 * Steps from the change until throughput is back within 10% of `target`: to the first
 * window of WINDOW lines whose mean is, after the dip below it (the speed file is polled, so
 * the slowdown lands a step or so after the change; no dip: 0 steps). null: not within the run.
 */
function stepsToWithin(curve, kind, changeAt, target) {
  const w = WINDOW[kind];
  const windowRate = (i) => mean(curve.slice(i, i + w).map((s) => s.rate));
  const from = curve.findIndex((s) => s.first >= changeAt);
  let dip = null;
  for (let i = from; i + w <= curve.length; i++) if (windowRate(i) < 0.9 * target) { dip = i; break; }
  if (dip === null) return 0;
  for (let i = dip; i + w <= curve.length; i++) if (windowRate(i) >= 0.9 * target) return curve[i].first - changeAt;
  return null;
}

/** Steps to within 10% of the new ideal, and what the run settled at (its last lines). */
function analyseSlowdown(curve, kind, changeAt, { ideal, newIdeal, alone, slow }) {
  const from = curve.findIndex((s) => s.first >= changeAt);
  const last = curve.slice(-SETTLED[kind]);
  const settled = mean(last.map((s) => s.rate));
  // The same lines had their split been perfect: the rebalancer's part of the gap to the ideal.
  const balanced = mean(last.map((s) => s.workers.reduce((a, x) => a + x.samples, 0) / (s.step_s - imbalanceS(s))));
  const pre = curve.slice(kind === "diloco" ? WARMUP_ROUNDS : WARMUP, from);
  // The best split held fixed over the same lines, in hindsight: shares in proportion to
  // each worker's mean rate over them, every line's own timings (its jitter) kept.
  const n = last[0].workers.length;
  const lineRates = last.map((s) => s.workers.map((x) => x.samples / x.forward_backward_s));
  const meanRates = Array.from({ length: n }, (_, i) => mean(lineRates.map((r) => r[i])));
  const total = last[0].workers.reduce((a, x) => a + x.samples, 0);
  const fixedSplit = meanRates.map((r) => (total * r) / meanRates.reduce((a, b) => a + b, 0));
  const hindsightS = last.map((s, k) => s.step_s - Math.max(...s.workers.map((x) => x.forward_backward_s)) + Math.max(...fixedSplit.map((x, i) => x / lineRates[k][i])));
  const ratesAfter = [slow, ...alone.slice(1)];
  const sum = ratesAfter.reduce((a, b) => a + b, 0);
  return {
    at_step: changeAt,
    ideal_samples_per_s: ideal,
    new_ideal_samples_per_s: newIdeal,
    before_samples_per_s: pre.length ? mean(pre.map((s) => s.rate)) : null,
    steps_to_within_10pct_of_ideal: stepsToWithin(curve, kind, changeAt, newIdeal),
    // Against what this run's last steps would have done perfectly split, which leaves out the
    // load of the host (the standalone runs that make the ideal ran at another time).
    steps_to_within_10pct_of_balanced: stepsToWithin(curve, kind, changeAt, balanced),
    settled_samples_per_s: settled,
    settled_fraction_of_ideal: settled / newIdeal,
    settled_balanced_samples_per_s: balanced,
    /** Settled against the same steps perfectly split, each at its own rates (no rebalancer reaches 1: it cannot know a step's jitter ahead). */
    split_efficiency: settled / balanced,
    /** Settled against the same steps under the best fixed split in hindsight (1: as good as that). */
    fixed_split_efficiency: mean(hindsightS) / mean(last.map((s) => s.step_s)),
    settled_idle_fraction: mean(last.map((s) => mean(s.workers.map((x) => x.idle_s)) / s.step_s)),
    shares_before: curve[Math.max(0, from - 1)].shares,
    shares_after: curve[curve.length - 1].shares,
    standalone_split_after: ratesAfter.map((r) => Math.round((batch * r) / sum)),
    curve: curve.map((s) => ({ step: s.step, first: s.first, samples_per_s: Math.round(s.rate), step_s: Number(s.step_s.toFixed(4)), shares: s.shares, workers: s.workers })),
  };
}

const machine = () => ({ cpu: os.cpus()[0]?.model ?? "cpu", cores: os.cpus().length });
const pct = (x) => `${(x * 100).toFixed(1)}%`;
const fmtSteps = (s, kind) => (s === null ? `> ${(kind === "diloco" ? DILOCO.steps : steps) / 2}` : String(s));

function slowdownLine(r) {
  return (
    `${r.kind} ${r.name}: shares ${r.shares_before.join(" : ")} -> ${r.shares_after.join(" : ")} (standalone ratio ${r.standalone_split_after.join(" : ")}); ` +
    `within 10% of the new ideal (${r.new_ideal_samples_per_s.toFixed(0)} samples/s) after ${fmtSteps(r.steps_to_within_10pct_of_ideal, r.kind)} steps; ` +
    `settled at ${r.settled_samples_per_s.toFixed(0)} (${pct(r.settled_fraction_of_ideal)} of ideal; ${pct(r.split_efficiency)} of the same steps perfectly split), load ${r.load_before} -> ${r.load_after}`
  );
}

try {
  const providers = reanalyse ? [] : await Promise.all(SPEEDS.map((_, i) => startProvider(i)));

  if (only === "slowdown") {
    const earlier = reanalyse ? JSON.parse(readFileSync(path.resolve(root, reanalyse), "utf8")) : null;
    const builds = earlier ? Object.fromEntries(Object.keys(earlier.builds).map((b) => [b, null])) : beforeCli ? { after: cli, before: beforeCli } : { after: cli };
    const runs = earlier
      ? earlier.runs.map((r) => {
          const curve = r.curve.map((c) => ({ ...c, rate: c.samples_per_s }));
          return { ...r, ...analyseSlowdown(curve, r.kind, r.at_step, { ...r.standalone }) };
        })
      : [];
    /** The summary of the runs so far, written after every repeat (a cut-short run keeps its figures). */
    const writeSlowdown = (date = new Date().toISOString()) => {
      const summary = [];
      for (const kind of ["sync", "diloco"]) {
        for (const build of Object.keys(builds)) {
          const rs = runs.filter((r) => r.kind === kind && r.build === build);
          const stepsTo = rs.map((r) => r.steps_to_within_10pct_of_ideal ?? Infinity);
          const stepsToBalanced = rs.map((r) => r.steps_to_within_10pct_of_balanced ?? Infinity);
          summary.push({
            kind,
            build,
            runs: rs.length,
            steps_to_within_10pct_of_ideal: stepsTo.map((s) => (s === Infinity ? null : s)),
            median_steps_to_within_10pct_of_ideal: median(stepsTo) === Infinity ? null : median(stepsTo),
            steps_to_within_10pct_of_balanced: stepsToBalanced.map((s) => (s === Infinity ? null : s)),
            median_steps_to_within_10pct_of_balanced: median(stepsToBalanced) === Infinity ? null : median(stepsToBalanced),
            median_settled_fraction_of_ideal: median(rs.map((r) => r.settled_fraction_of_ideal)),
            median_split_efficiency: median(rs.map((r) => r.split_efficiency)),
          median_fixed_split_efficiency: median(rs.map((r) => r.fixed_split_efficiency)),
            median_before_fraction_of_ideal: median(rs.filter((r) => r.before_samples_per_s !== null).map((r) => r.before_samples_per_s / r.ideal_samples_per_s)),
            settled_shares: rs.map((r) => r.shares_after),
            standalone_split_after: rs.map((r) => r.standalone_split_after),
            load: rs.map((r) => [r.load_before, r.load_after]),
          });
        }
      }
      const result = { date, machine: machine(), speeds: SPEEDS, slow: SLOW, steps, diloco_steps: DILOCO.steps, inner_steps: innerSteps, batch, repeat: new Set(runs.map((r) => r.repeat)).size, builds: earlier ? earlier.builds : { after: "this checkout", ...(before ? { before: path.basename(path.resolve(before)) } : {}) }, summary, runs };
      const table = [
        `Provider 0 slowed from 1 to ${SLOW} halfway (speeds ${SPEEDS.join(" : ")}, MNIST batch ${batch}; sync ${steps} steps, DiLoCo H=${innerSteps} ${DILOCO.steps} steps), ${result.machine.cores}-core ${result.machine.cpu}, ${result.repeat} repeat(s), medians`,
        "",
        "| strategy | coordinator | steps to within 10% of the new ideal (each run) | steps to within 10% of its settled steps perfectly split (each run) | settled, of the new ideal | settled, of the same steps at the best fixed split in hindsight | settled, of the same steps perfectly split | before the change, of the ideal | load average (1 min) during the runs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ...summary.map(
          (s) =>
            `| ${s.kind} | ${s.build} | ${s.median_steps_to_within_10pct_of_ideal ?? "not within the run"} (${s.steps_to_within_10pct_of_ideal.map((x) => x ?? "-").join(", ")}) | ${s.median_steps_to_within_10pct_of_balanced ?? "not within the run"} (${s.steps_to_within_10pct_of_balanced.map((x) => x ?? "-").join(", ")}) | ${pct(s.median_settled_fraction_of_ideal)} | ${pct(s.median_fixed_split_efficiency)} | ${pct(s.median_split_efficiency)} | ${s.median_before_fraction_of_ideal === null ? "-" : pct(s.median_before_fraction_of_ideal)} | ${s.load.map(([a, b]) => `${a.toFixed(1)}-${b.toFixed(1)}`).join(", ")} |`,
        ),
      ].join("\n");
      console.log(`\n${table}`);
      mkdirSync(path.dirname(out), { recursive: true });
      writeFileSync(out, JSON.stringify(result, null, 2));
      console.log(`wrote ${path.relative(root, out)}`);
      if (md) {
        writeFileSync(path.resolve(root, md), `${table}\n`);
        console.log(`wrote ${md}`);
      }
    };
    if (earlier) writeSlowdown(earlier.date);
    for (let rep = 0; rep < (earlier ? 0 : repeat); rep++) {
      process.stderr.write(`repeat ${rep + 1}/${repeat}: standalone throughput of each provider (load ${load()}) ...\n`);
      const ideal = await standalones(providers, `-${rep}`);
      // Alternating: the builds swap places every repeat, so load drifts count against both.
      const order = Object.keys(builds);
      if (rep % 2 === 1) order.reverse();
      for (const kind of ["sync", "diloco"]) {
        for (const build of order) {
          process.stderr.write(`  ${kind}, ${build} (load ${load()}) ...\n`);
          const r = await slowdown(`${kind}-${build}-${rep}`, providers, kind, ideal, builds[build]);
          runs.push({ repeat: rep, build, standalone: ideal, ...r });
          console.log(slowdownLine(r));
        }
      }
      writeSlowdown();
    }
  } else {
    process.stderr.write("standalone throughput of each provider ...\n");
    const ideal = await standalones(providers);
    const standalone = ideal.alone;
    process.stderr.write(`diloco (H=${innerSteps}), equal and measured shares ...\n`);
    const dilocoEqual = steadyRounds(await train("diloco-equal", providers, "equal", { extra: DILOCO }));
    const dilocoWeightedCurve = await train("diloco-weighted", providers, "measured", { extra: DILOCO });
    const dilocoWeighted = steadyRounds(dilocoWeightedCurve);
    process.stderr.write(`diloco, slowing provider 0 to ${SLOW} at step ${DILOCO.steps / 2} ...\n`);
    const dilocoSlowdown = await slowdown("diloco-recovery", providers, "diloco", ideal);
    const diloco = {
      inner_steps: innerSteps,
      steps: DILOCO.steps,
      equal_samples_per_s: dilocoEqual,
      weighted_samples_per_s: dilocoWeighted,
      equal_fraction_of_ideal: dilocoEqual / ideal.ideal,
      weighted_fraction_of_ideal: dilocoWeighted / ideal.ideal,
      weighted_final_shares: dilocoWeightedCurve[dilocoWeightedCurve.length - 1].shares,
      slowdown: dilocoSlowdown,
    };
    const header = () => {
      console.log(`\nHeterogeneous providers at speeds ${SPEEDS.join(" : ")}, MNIST batch ${batch}, ${machine().cores}-core ${machine().cpu}`);
      console.log("| setting | samples/s | of ideal |");
      console.log("| --- | --- | --- |");
      console.log(`| (c) ideal: sum of standalone (${standalone.map((x) => x.toFixed(0)).join(" + ")}) | ${ideal.ideal.toFixed(0)} | 100% |`);
    };
    const dilocoRows = () => {
      console.log(`| (d) diloco H=${innerSteps}, equal shares | ${dilocoEqual.toFixed(0)} | ${pct(dilocoEqual / ideal.ideal)} |`);
      console.log(`| (e) diloco H=${innerSteps}, measured shares (final ${diloco.weighted_final_shares.join(" : ")}) | ${dilocoWeighted.toFixed(0)} | ${pct(dilocoWeighted / ideal.ideal)} |`);
    };
    const common = { date: new Date().toISOString(), machine: machine(), speeds: SPEEDS, batch, standalone_samples_per_s: standalone, ideal_samples_per_s: ideal.ideal, slow_standalone_samples_per_s: ideal.slow };
    if (only === "diloco") {
      header();
      dilocoRows();
      console.log(`\n${slowdownLine(dilocoSlowdown)}`);
      mkdirSync(path.dirname(out), { recursive: true });
      writeFileSync(out, JSON.stringify({ ...common, diloco }, null, 2));
      console.log(`wrote ${path.relative(root, out)}`);
    } else {
      process.stderr.write("equal shares ...\n");
      const equal = steady(await train("equal", providers, "equal"));
      process.stderr.write("capability-weighted shares ...\n");
      const weightedCurve = await train("weighted", providers, "measured");
      const weighted = steady(weightedCurve);
      process.stderr.write(`slowing provider 0 to ${SLOW} at step ${Math.floor(steps / 2)} ...\n`);
      const sync = await slowdown("recovery", providers, "sync", ideal);
      const result = {
        ...common,
        steps,
        equal_samples_per_s: equal,
        weighted_samples_per_s: weighted,
        equal_fraction_of_ideal: equal / ideal.ideal,
        weighted_fraction_of_ideal: weighted / ideal.ideal,
        weighted_final_shares: weightedCurve[weightedCurve.length - 1].shares,
        diloco,
        slowdown: sync,
        weighted_curve: weightedCurve.map((s) => ({ step: s.step, samples_per_s: Math.round(s.rate), shares: s.shares })),
      };
      header();
      console.log(`| (a) equal shares | ${equal.toFixed(0)} | ${pct(equal / ideal.ideal)} |`);
      console.log(`| (b) capability-weighted (final shares ${result.weighted_final_shares.join(" : ")}) | ${weighted.toFixed(0)} | ${pct(weighted / ideal.ideal)} |`);
      dilocoRows();
      console.log(`\n${slowdownLine(sync)}\n${slowdownLine(dilocoSlowdown)}`);
      mkdirSync(path.dirname(out), { recursive: true });
      writeFileSync(out, JSON.stringify(result, null, 2));
      console.log(`wrote ${path.relative(root, out)}`);
    }
  }
} finally {
  for (const c of children) c.kill("SIGTERM");
  rmSync(tmp, { recursive: true, force: true });
}
