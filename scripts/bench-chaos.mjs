// Chaos soak: four `nimble provide` processes train the MNIST example while faults are
// injected at random steps: kill -9 of a provider (started again on the same port, so it
// rejoins), SIGKILL of one Python worker (its provider restarts it), and SIGSTOP of a
// provider past the heartbeat deadline (then SIGCONT: it comes back and rejoins).
// Prints the recovery times (fault to the next completed step): median and worst, per
// kind, and writes JSON.
//
//   npm run bench:chaos [-- --steps 800 --faults 8 --seed 1 --out results/chaos.json]
import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { stringify } from "yaml";
import { arg, CLI as cli, ROOT as root } from "./lib/args.mjs";

const steps = Number(arg("steps", "800"));
const faultCount = Number(arg("faults", "8"));
const out = path.resolve(root, arg("out", "results/chaos.json"));
let seed = Number(arg("seed", "1"));
const random = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
const HEARTBEAT_S = 2;
const PROVIDERS = 4;
const tmp = mkdtempSync(path.join(os.tmpdir(), "nimble-bench-chaos-"));
const t0 = Date.now();
const children = new Set();

function startProvider(i, port = 0) {
  const token = `chaos-${i}`;
  const child = spawn(process.execPath, [cli, "provide", "--host", "127.0.0.1", "--port", String(port), "--token", token, "--json", "--no-profile", "--threads", "1"], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  children.add(child);
  child.once("exit", () => children.delete(child));
  return new Promise((resolve, reject) => {
    let listening = false;
    createInterface({ input: child.stdout }).on("line", (line) => {
      try {
        const e = JSON.parse(line);
        if (e.type === "listening") {
          listening = true;
          resolve({ address: e.url, port: e.port, token, child });
        }
      } catch {
        // not an event
      }
    });
    child.once("exit", (code) => {
      if (!listening) reject(new Error(`provider ${i} exited before listening (${code})`));
    });
  });
}

const providers = [];
for (let i = 0; i < PROVIDERS; i++) providers.push(await startProvider(i));

// A fault every `gap` steps or so, each once all four workers are back in the ring (so that
// each one strikes a full ring and its recovery is measured on its own).
const gap = Math.floor((steps - 40) / faultCount);
let nextFaultAt = Math.floor(gap / 2);
let allTraining = false;
const kinds = ["kill provider", "kill worker", "stop provider"];
const injected = [];

async function inject(step) {
  const kind = kinds[injected.length % kinds.length];
  const i = 1 + Math.floor(random() * (PROVIDERS - 1)); // provider 0 stays, so a peer always holds the state
  const p = providers[i];
  injected.push({ step, kind, provider: i, at: Date.now(), detected_s: null, rejoined_s: null });
  process.stderr.write(`step ${step}: ${kind} (provider ${i})\n`);
  if (kind === "kill provider") {
    p.child.kill("SIGKILL");
    setTimeout(() => startProvider(i, p.port).then((q) => (providers[i] = q), (err) => process.stderr.write(`${err.message}\n`)), 1000);
  } else if (kind === "kill worker") {
    let pids = [];
    try {
      pids = execFileSync("pgrep", ["-P", String(p.child.pid), "-f", "nimble_worker"], { encoding: "utf8" }).trim().split("\n").filter(Boolean);
    } catch {
      // no worker right now (it was out of the ring)
    }
    for (const pid of pids) process.kill(Number(pid), "SIGKILL");
  } else {
    p.child.kill("SIGSTOP");
    setTimeout(() => p.child.kill("SIGCONT"), (HEARTBEAT_S + 2) * 1000);
  }
}

const config = {
  name: "chaos",
  task: path.join(root, "examples", "mnist", "task.py"),
  steps,
  batch_size: 256,
  optimizer: { name: "adam", lr: 0.002 },
  eval: { every: 0, samples: 1000, batch_size: 500 },
  faults: { heartbeat_s: HEARTBEAT_S, min_workers: 1, wait_s: 60 },
  providers: providers.map((p) => ({ address: p.address, token: p.token })),
  output: path.join(tmp, "runs"),
};
const file = path.join(tmp, "chaos.yaml");
writeFileSync(file, stringify(config));
try {
  const summary = await new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cli, "train", file, "--json"], { stdio: ["ignore", "pipe", "inherit"] });
    children.add(child);
    let done = null;
    createInterface({ input: child.stdout }).on("line", (line) => {
      const e = JSON.parse(line);
      if (e.type === "workers" || e.type === "step") allTraining = e.workers.filter((w) => w.state === "training").length === PROVIDERS;
      if (e.type === "step" && e.step >= nextFaultAt && allTraining && injected.length < faultCount && e.step < steps - 30) {
        nextFaultAt = e.step + gap + Math.floor(random() * 5);
        void inject(e.step);
      }
      if (e.type === "status" && /^(Fault|Ring re-formed|Rank)/.test(e.message)) process.stderr.write(`  [${((Date.now() - t0) / 1000).toFixed(2)} s] ${e.message}\n`);
      // Per injected fault: seconds until the coordinator names it, and until it is back in the ring.
      const last = injected.at(-1);
      if (last && e.type === "status" && e.message.startsWith("Fault:") && last.detected_s === null) last.detected_s = (Date.now() - last.at) / 1000;
      if (last && e.type === "status" && / joined before step /.test(e.message) && last.rejoined_s === null) last.rejoined_s = (Date.now() - last.at) / 1000;
      if (e.type === "done") done = e.summary;
    });
    child.once("exit", (code) => (code === 0 && done ? resolve(done) : reject(new Error(`nimble train exited ${code}`))));
  });
  const times = summary.faults.map((f) => f.recovery_s).filter((x) => typeof x === "number").sort((a, b) => a - b);
  const median = (xs) => (xs.length ? xs[Math.floor((xs.length - 1) / 2)] : null);
  const byKind = {};
  for (const f of summary.faults) (byKind[f.kind] ??= []).push(f.recovery_s);
  const metrics = readFileSync(path.join(summary.run_dir, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l));
  const everyStepOnce = metrics.map((m) => m.step).join() === [...Array(steps).keys()].join();
  const result = {
    date: new Date().toISOString(),
    machine: { cpu: os.cpus()[0]?.model ?? "cpu", cores: os.cpus().length },
    steps,
    heartbeat_s: HEARTBEAT_S,
    injected,
    faults_seen: summary.faults.length,
    steps_redone: summary.steps_redone.length,
    recovery_s: { median: median(times), worst: times.at(-1) ?? null, all: times },
    by_kind: Object.fromEntries(Object.entries(byKind).map(([k, xs]) => [k, { count: xs.length, median: median([...xs].sort((a, b) => a - b)), worst: Math.max(...xs) }])),
    every_step_once: everyStepOnce,
    final_eval: summary.eval,
    wall_s: summary.wall_s,
  };
  console.log(`\nChaos soak: ${steps} MNIST steps on ${PROVIDERS} providers, ${injected.length} faults injected, heartbeat ${HEARTBEAT_S} s, ${result.machine.cores}-core ${result.machine.cpu}`);
  console.log("| fault | seen | recovery median | worst |");
  console.log("| --- | --- | --- | --- |");
  for (const [k, v] of Object.entries(result.by_kind)) console.log(`| ${k} | ${v.count} | ${v.median?.toFixed(1)} s | ${v.worst.toFixed(1)} s |`);
  console.log(`| all | ${result.faults_seen} | ${result.recovery_s.median?.toFixed(1)} s | ${result.recovery_s.worst?.toFixed(1)} s |`);
  console.log("\n| injected at step | fault | named after | back in the ring after |");
  console.log("| --- | --- | --- | --- |");
  for (const f of injected) console.log(`| ${f.step} | ${f.kind} | ${f.detected_s?.toFixed(1) ?? "-"} s | ${f.rejoined_s === null ? "not before the end" : `${f.rejoined_s.toFixed(1)} s`} |`);
  console.log(`steps redone ${result.steps_redone}; every step exactly once: ${everyStepOnce}; final eval ${JSON.stringify(summary.eval)}; wall ${summary.wall_s.toFixed(0)} s`);
  mkdirSync(path.dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify(result, null, 2));
  console.log(`wrote ${path.relative(root, out)}`);
} finally {
  for (const c of children) {
    c.kill("SIGCONT");
    c.kill("SIGKILL");
  }
  rmSync(tmp, { recursive: true, force: true });
}
