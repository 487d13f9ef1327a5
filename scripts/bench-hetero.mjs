// Heterogeneous providers: three local `nimble provide` processes slowed to 1 : 0.5 : 0.25 of
// their speed (the providers' --speed-file testing aid), training the MNIST example.
//   (a) equal shares, (b) capability-weighted shares (measured, self-correcting), against
//   (c) the ideal: the sum of each provider's standalone throughput.
// Then provider 0 is slowed to 0.25 mid-run: steps until throughput is back within 10% of
// the new ideal. And DiLoCo (strategy diloco, H = --inner-steps): (d) equal shares and (e)
// measured shares, whose inner steps then take about the same time on every provider.
// Prints a table and writes JSON.
//
//   npm run bench:hetero [-- --steps 40 --batch 1024 --inner-steps 4 --out results/hetero.json]
//   npm run bench:hetero -- --only diloco      # the standalone runs and the DiLoCo cases
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { stringify } from "yaml";
import { arg, CLI as cli, ROOT as root } from "./lib/args.mjs";

const steps = Number(arg("steps", "40"));
// Large enough that compute, not per-step fixed costs, dominates a step on a CPU.
const batch = Number(arg("batch", "1024"));
const out = path.resolve(root, arg("out", "results/hetero.json"));
const only = arg("only", null);
const innerSteps = Number(arg("inner-steps", "4"));
/** DiLoCo rounds of `innerSteps` inner steps, twice the steps (a line a round), int8 pseudo-gradients. */
const DILOCO = { strategy: { name: "diloco", inner_steps: innerSteps, codec: "int8" }, steps: Math.ceil((2 * steps) / innerSteps) * innerSteps };
const WARMUP_ROUNDS = 2;
const SPEEDS = [1, 0.5, 0.25];
const WARMUP = 8; // steps left out of throughput figures (worker start, first rebalancing)
const tmp = mkdtempSync(path.join(os.tmpdir(), "nimble-bench-hetero-"));
const children = [];

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

/** One `nimble train` run; `onStep(step)` may act mid-run. Returns per-step samples/s. */
function train(name, providers, balance, onStep = () => {}, extra = {}) {
  const config = {
    name,
    task: path.join(root, "examples", "mnist", "task.py"),
    steps,
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
    const child = spawn(process.execPath, [cli, "train", file, "--json"], { stdio: ["ignore", "pipe", "inherit"] });
    let runDir = "";
    createInterface({ input: child.stdout }).on("line", (line) => {
      const e = JSON.parse(line);
      if (e.type === "step") onStep(e.step);
      if (e.type === "done") runDir = e.run_dir;
    });
    child.once("exit", (code) => {
      if (code !== 0 || !runDir) return reject(new Error(`${name}: nimble train exited ${code}`));
      const lines = readFileSync(path.join(runDir, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l));
      resolve(lines.map((l) => ({ step: l.step, rate: l.samples / l.step_s, shares: l.workers.map((w) => w.share) })));
    });
  });
}

const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
const steady = (curve) => mean(curve.slice(WARMUP).map((s) => s.rate));

try {
  const providers = await Promise.all(SPEEDS.map((_, i) => startProvider(i)));
  process.stderr.write("standalone throughput of each provider ...\n");
  const standalone = [];
  for (let i = 0; i < providers.length; i++) standalone.push(steady(await train(`alone-${i}`, [providers[i]], "equal")));
  const ideal = standalone.reduce((a, b) => a + b, 0);
  // DiLoCo: a metrics line per round (its samples over its time), the first rounds left out.
  const steadyRounds = (curve) => mean(curve.slice(WARMUP_ROUNDS).map((s) => s.rate));
  process.stderr.write(`diloco (H=${innerSteps}), equal and measured shares ...\n`);
  const dilocoEqual = steadyRounds(await train("diloco-equal", providers, "equal", undefined, DILOCO));
  const dilocoWeightedCurve = await train("diloco-weighted", providers, "measured", undefined, DILOCO);
  const dilocoWeighted = steadyRounds(dilocoWeightedCurve);
  const diloco = {
    inner_steps: innerSteps,
    steps: DILOCO.steps,
    equal_samples_per_s: dilocoEqual,
    weighted_samples_per_s: dilocoWeighted,
    equal_fraction_of_ideal: dilocoEqual / ideal,
    weighted_fraction_of_ideal: dilocoWeighted / ideal,
    weighted_final_shares: dilocoWeightedCurve[dilocoWeightedCurve.length - 1].shares,
  };
  const dilocoRows = () => {
    console.log(`| (d) diloco H=${innerSteps}, equal shares | ${dilocoEqual.toFixed(0)} | ${((dilocoEqual / ideal) * 100).toFixed(1)}% |`);
    console.log(`| (e) diloco H=${innerSteps}, measured shares (final ${diloco.weighted_final_shares.join(" : ")}) | ${dilocoWeighted.toFixed(0)} | ${((dilocoWeighted / ideal) * 100).toFixed(1)}% |`);
  };
  if (only === "diloco") {
    const result = { date: new Date().toISOString(), machine: { cpu: os.cpus()[0]?.model ?? "cpu", cores: os.cpus().length }, speeds: SPEEDS, batch, standalone_samples_per_s: standalone, ideal_samples_per_s: ideal, diloco };
    console.log(`\nHeterogeneous providers at speeds ${SPEEDS.join(" : ")}, MNIST batch ${batch}, ${result.machine.cores}-core ${result.machine.cpu}`);
    console.log("| setting | samples/s | of ideal |");
    console.log("| --- | --- | --- |");
    console.log(`| (c) ideal: sum of standalone (${standalone.map((x) => x.toFixed(0)).join(" + ")}) | ${ideal.toFixed(0)} | 100% |`);
    dilocoRows();
    mkdirSync(path.dirname(out), { recursive: true });
    writeFileSync(out, JSON.stringify(result, null, 2));
    console.log(`wrote ${path.relative(root, out)}`);
    for (const c of children) c.kill("SIGTERM");
    rmSync(tmp, { recursive: true, force: true });
    process.exit(0);
  }
  process.stderr.write("equal shares ...\n");
  const equal = steady(await train("equal", providers, "equal"));
  process.stderr.write("capability-weighted shares ...\n");
  const weightedCurve = await train("weighted", providers, "measured");
  const weighted = steady(weightedCurve);

  // Provider 0 slowed to 0.25 of its speed: its standalone rate at that speed is the new ideal's part.
  writeFileSync(providers[0].speedFile, "0.25");
  await new Promise((r) => setTimeout(r, 1200));
  const slowStandalone = steady(await train("alone-0-slow", [providers[0]], "equal"));
  writeFileSync(providers[0].speedFile, "1");
  await new Promise((r) => setTimeout(r, 1200));
  const newIdeal = slowStandalone + standalone[1] + standalone[2];
  const changeAt = Math.floor(steps / 2);
  process.stderr.write(`slowing provider 0 to 0.25 at step ${changeAt} ...\n`);
  const recoveryCurve = await train("recovery", providers, "measured", (step) => {
    if (step === changeAt) writeFileSync(providers[0].speedFile, "0.25");
  });
  // The speed file is polled, so the slowdown lands a step or so after the change: count
  // from the change to the first 3-step window back within 10% of the new ideal, after
  // the dip below it (no dip: 0 steps).
  const window3 = (i) => mean(recoveryCurve.slice(i, i + 3).map((s) => s.rate));
  let dip = null;
  for (let i = changeAt; i + 3 <= recoveryCurve.length; i++) if (window3(i) < 0.9 * newIdeal) { dip = i; break; }
  let recoverySteps = dip === null ? 0 : null;
  for (let i = dip ?? recoveryCurve.length; i + 3 <= recoveryCurve.length; i++) {
    if (window3(i) >= 0.9 * newIdeal) {
      recoverySteps = i - changeAt;
      break;
    }
  }
  // Also against what the cluster settles at after the change (its last 10 steps), which
  // separates how fast shares adapt from how close the settled split gets to the ideal.
  const settled = mean(recoveryCurve.slice(-10).map((s) => s.rate));
  let settleSteps = null;
  for (let i = changeAt; i + 3 <= recoveryCurve.length; i++) {
    if (Math.abs(mean(recoveryCurve.slice(i, i + 3).map((s) => s.rate)) - settled) <= 0.1 * settled) {
      settleSteps = i - changeAt;
      break;
    }
  }
  const result = {
    date: new Date().toISOString(),
    machine: { cpu: os.cpus()[0]?.model ?? "cpu", cores: os.cpus().length },
    speeds: SPEEDS,
    steps,
    batch,
    standalone_samples_per_s: standalone,
    ideal_samples_per_s: ideal,
    equal_samples_per_s: equal,
    weighted_samples_per_s: weighted,
    equal_fraction_of_ideal: equal / ideal,
    weighted_fraction_of_ideal: weighted / ideal,
    weighted_final_shares: weightedCurve[weightedCurve.length - 1].shares,
    diloco,
    slowdown: {
      at_step: changeAt,
      new_ideal_samples_per_s: newIdeal,
      steps_to_within_10pct_of_ideal: recoverySteps,
      settled_samples_per_s: settled,
      steps_to_within_10pct_of_settled: settleSteps,
      shares_before: recoveryCurve[changeAt - 1].shares,
      shares_after: recoveryCurve[recoveryCurve.length - 1].shares,
      curve: recoveryCurve.map((s) => ({ step: s.step, samples_per_s: Math.round(s.rate), shares: s.shares })),
    },
    weighted_curve: weightedCurve.map((s) => ({ step: s.step, samples_per_s: Math.round(s.rate), shares: s.shares })),
  };
  console.log(`\nHeterogeneous providers at speeds ${SPEEDS.join(" : ")}, MNIST batch ${batch}, ${result.machine.cores}-core ${result.machine.cpu}`);
  console.log("| setting | samples/s | of ideal |");
  console.log("| --- | --- | --- |");
  console.log(`| (c) ideal: sum of standalone (${standalone.map((x) => x.toFixed(0)).join(" + ")}) | ${ideal.toFixed(0)} | 100% |`);
  console.log(`| (a) equal shares | ${equal.toFixed(0)} | ${((equal / ideal) * 100).toFixed(1)}% |`);
  console.log(`| (b) capability-weighted (final shares ${result.weighted_final_shares.join(" : ")}) | ${weighted.toFixed(0)} | ${((weighted / ideal) * 100).toFixed(1)}% |`);
  dilocoRows();
  console.log(
    `\nprovider 0 slowed to 0.25 at step ${changeAt}: shares ${result.slowdown.shares_before.join(" : ")} -> ${result.slowdown.shares_after.join(" : ")}; ` +
      `within 10% of the new ideal (${newIdeal.toFixed(0)} samples/s) after ${recoverySteps ?? "more than " + (steps - changeAt - 3)} steps; ` +
      `within 10% of its settled rate (${settled.toFixed(0)} samples/s) after ${settleSteps} steps`,
  );
  mkdirSync(path.dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify(result, null, 2));
  console.log(`wrote ${path.relative(root, out)}`);
} finally {
  for (const c of children) c.kill("SIGTERM");
  rmSync(tmp, { recursive: true, force: true });
}
