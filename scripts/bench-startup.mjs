// Time from `nimble train` to the first completed step of the MNIST example on 3 local
// providers, in alternating runs:
//   cold: the embedded default, `nimble train` starting its own local providers;
//   warm: 3 `nimble provide` processes already running (started once, given time to warm
//         up: with warm spares, until each says its warm worker is ready), the job's
//         config naming them. Each warm run leaves them to start fresh spares for the next.
// Prints medians, where the time went (from the events as they arrive, and from
// summary.json's `startup` where the CLI writes one) and the load average. With
// --base-cli, a reference build (e.g. the commit before warm spares, built elsewhere) runs
// the same two modes in the same alternation, each with its own providers.
//
//   npm run build && node scripts/bench-startup.mjs [--runs 3] [--base-cli /path/to/old/dist/cli.js]
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { stringify } from "yaml";
import { arg, CLI, ROOT } from "./lib/args.mjs";
import { killGroups, median } from "./lib/stats.mjs";

const runs = Number(arg("runs", "3"));
const variants = [{ label: "now", cli: path.resolve(arg("cli", CLI)) }, ...(arg("base-cli", "") ? [{ label: "before", cli: path.resolve(arg("base-cli", "")) }] : [])];
const jsonOut = arg("json", path.join(ROOT, "results", "startup.json"));
const python = arg("python", process.env.NIMBLE_PYTHON ?? "");
const WORKERS = 3;
const SETTLE_MS = 8000; // without warm spares: time for providers to finish starting
const RUN_TIMEOUT_MS = 180_000;

const tmp = mkdtempSync(path.join(os.tmpdir(), "nimble-bench-startup-"));
const key = path.join(tmp, "key");
const children = new Set();
const base = {
  task: path.join(ROOT, "examples", "mnist", "task.py"),
  steps: 2,
  batch_size: 64,
  seed: 0,
  optimizer: { name: "adam", lr: 0.005 },
  eval: { every: 0, samples: 100, batch_size: 100 },
  checkpoint: { every: 0 },
  output: path.join(tmp, "runs"),
};

function start(cli, args, onLine) {
  const child = spawn(process.execPath, [cli, ...args], { stdio: ["ignore", "pipe", "pipe"], detached: true });
  children.add(child);
  createInterface({ input: child.stdout }).on("line", (l) => onLine(l, "stdout"));
  createInterface({ input: child.stderr }).on("line", (l) => onLine(l, "stderr"));
  return child;
}

const pythonArgs = python ? ["--python", python] : [];

/** One `nimble train`: seconds to each milestone, from the events as they arrive. */
function train(cli, config) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const at = {};
    const mark = (name) => (at[name] ??= (performance.now() - t0) / 1000);
    let runDir = null;
    const tail = [];
    const child = start(cli, ["train", config, "--json", "--key", key, ...pythonArgs], (line, stream) => {
      if (stream === "stderr") return void (tail.push(line), tail.length > 20 && tail.shift());
      let e;
      try {
        e = JSON.parse(line);
      } catch {
        return;
      }
      mark("first_event");
      if (e.type === "status" && /^Starting \d+ local provider/.test(e.message)) mark("python");
      if (e.type === "status" && /^Connecting to/.test(e.message)) mark("providers_up");
      if (e.type === "workers") mark("connected");
      if (e.type === "status" && /^Workers ready/.test(e.message)) mark("workers_ready");
      if (e.type === "step") mark("first_step");
      if (e.type === "done") runDir = e.run_dir;
    });
    const timer = setTimeout(() => child.kill("SIGKILL"), RUN_TIMEOUT_MS);
    child.once("exit", (code) => {
      clearTimeout(timer);
      children.delete(child);
      if (code !== 0 || at.first_step === undefined) return reject(new Error(`nimble train exited ${code}: ${tail.join("\n")}`));
      let startup = null;
      try {
        startup = JSON.parse(readFileSync(path.join(runDir, "summary.json"), "utf8")).startup ?? null;
      } catch {
        // an older CLI: no summary figures
      }
      resolve({ first_step_s: at.first_step, milestones: at, startup });
    });
  });
}

/** WORKERS `nimble provide` processes in key mode admitting `key`; resolves when each is warm (or settled). */
async function startProviders(cli) {
  const identity = await new Promise((resolve) => {
    let out = "";
    const c = start(cli, ["id", "--key", key, "--json"], (l) => (out += l));
    c.once("exit", () => resolve(JSON.parse(out)));
  });
  const started = performance.now();
  const providers = await Promise.all(
    Array.from({ length: WORKERS }, () => new Promise((resolve, reject) => {
      let listening = null;
      let warm = false;
      const child = start(cli, ["provide", "--host", "127.0.0.1", "--port", "0", "--json", "--no-profile", "--key", key, "--allow", identity.key, "--threads", "1", ...pythonArgs], (line) => {
        let e;
        try {
          e = JSON.parse(line);
        } catch {
          return;
        }
        if (e.type === "listening") {
          listening = { address: e.url, key: e.key, child, warm: e.warm === true };
          if (!listening.warm) resolve(listening);
        }
        if (e.type === "spare" && e.state === "ready" && !warm) {
          warm = true;
          if (listening) resolve(listening);
        }
      });
      child.once("exit", (code) => reject(new Error(`nimble provide exited ${code}`)));
    })),
  );
  if (!providers.every((p) => p.warm)) await new Promise((r) => setTimeout(r, SETTLE_MS));
  return { providers, ready_s: (performance.now() - started) / 1000 };
}

/** After a warm run: wait until every provider says its fresh spare is ready (bounded). */
function waitForSpares(providers) {
  if (!providers.every((p) => p.warm)) return new Promise((r) => setTimeout(r, 2000));
  return Promise.all(providers.map((p) => new Promise((resolve) => {
    const timer = setTimeout(resolve, 30_000);
    createInterface({ input: p.child.stdout }).on("line", (line) => {
      if (line.includes('"type":"spare"') && line.includes('"state":"ready"')) {
        clearTimeout(timer);
        resolve();
      }
    });
  })));
}

const loads = [];
const load = () => loads.push(os.loadavg()[0]);
try {
  for (const v of variants) {
    v.rows = { cold: [], warm: [] };
    v.coldConfig = path.join(tmp, `cold-${v.label}.yaml`);
    writeFileSync(v.coldConfig, stringify({ name: `startup-cold-${v.label}`, ...base, local_workers: WORKERS }));
    const { providers, ready_s } = await startProviders(v.cli);
    v.providers = providers;
    console.log(`${v.label}: ${WORKERS} providers up (${providers.every((p) => p.warm) ? "warm workers ready" : "no warm workers"}) after ${ready_s.toFixed(1)} s`);
    v.warmConfig = path.join(tmp, `warm-${v.label}.yaml`);
    writeFileSync(v.warmConfig, stringify({ name: `startup-warm-${v.label}`, ...base, providers: providers.map((p) => ({ address: p.address, key: p.key })) }));
  }
  for (let i = 0; i < runs; i++) {
    for (const v of variants) {
      load();
      const c = await train(v.cli, v.coldConfig);
      v.rows.cold.push(c);
      console.log(`${v.label} cold ${i + 1}: first step ${c.first_step_s.toFixed(2)} s`);
      load();
      const w = await train(v.cli, v.warmConfig);
      v.rows.warm.push(w);
      console.log(`${v.label} warm ${i + 1}: first step ${w.first_step_s.toFixed(2)} s${w.startup ? ` (${w.startup.workers.filter((x) => x.warm).length} of ${w.startup.workers.length} workers warm)` : ""}`);
      await waitForSpares(v.providers);
    }
  }
} finally {
  killGroups(children);
  rmSync(tmp, { recursive: true, force: true });
}

/** Medians of each milestone and of each summary phase. */
function summarize(list) {
  const keys = [...new Set(list.flatMap((r) => Object.keys(r.milestones)))];
  const phases = [...new Set(list.flatMap((r) => Object.keys(r.startup?.phases ?? {})))];
  return {
    first_step_s: median(list.map((r) => r.first_step_s)),
    runs: list.map((r) => r.first_step_s),
    milestones_s: Object.fromEntries(keys.map((k) => [k, median(list.map((r) => r.milestones[k]).filter((v) => v !== undefined))])),
    phases_s: Object.fromEntries(phases.map((k) => [k, median(list.map((r) => r.startup?.phases?.[k]).filter((v) => v !== undefined))])),
    worker_import_s: median(list.flatMap((r) => r.startup?.workers.map((w) => w.import_s) ?? [])),
    worker_load_s: median(list.flatMap((r) => r.startup?.workers.map((w) => w.load_s) ?? [])),
    warm_workers: list.map((r) => r.startup?.workers.filter((w) => w.warm).length ?? null),
  };
}

const result = {
  runs,
  workers: WORKERS,
  machine: `${os.cpus().length} cores, ${os.cpus()[0]?.model ?? "?"}`,
  load_avg_1m: { min: Math.min(...loads), max: Math.max(...loads), median: median(loads) },
  ...Object.fromEntries(variants.map((v) => [v.label, { cli: v.cli, cold: summarize(v.rows.cold), warm: summarize(v.rows.warm) }])),
};
writeFileSync(jsonOut, `${JSON.stringify(result, null, 2)}\n`);
writeFileSync(jsonOut.replace(/\.json$/, ".md"), markdown(result));
console.log(markdown(result));
console.log(`wrote ${jsonOut}`);

function markdown(r) {
  const f = (x) => (x === null || x === undefined ? "-" : x.toFixed(2));
  const rows = variants.flatMap((v) => ["cold", "warm"].map((mode) => ({ name: `${v.label}, ${mode}`, s: r[v.label][mode] })));
  const now = r.now;
  const lines = [
    `# Start-up: \`nimble train\` to the first completed step (MNIST example, ${WORKERS} local providers)`,
    "",
    `${r.runs} alternating runs per row, medians; ${r.machine}; load average (1 min) ${r.load_avg_1m.min.toFixed(1)}-${r.load_avg_1m.max.toFixed(1)}, median ${r.load_avg_1m.median.toFixed(1)}.`,
    "cold: `nimble train` starts its own local providers; warm: providers already running (`nimble provide`, warm workers ready where the build has them).",
    "",
    "| run | first step (s) | runs (s) | providers up | connected | workers ready | workers warm |",
    "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ...rows.map(({ name, s }) => `| ${name} | ${f(s.first_step_s)} | ${s.runs.map(f).join(", ")} | ${f(s.milestones_s.providers_up)} | ${f(s.milestones_s.connected)} | ${f(s.milestones_s.workers_ready)} | ${s.warm_workers.map((n) => (n === null ? "-" : `${n}/${WORKERS}`)).join(", ")} |`),
    "",
    `Ratios: warm / cold ${f(now.warm.first_step_s / now.cold.first_step_s)}${r.before ? `; now / before: cold ${f(now.cold.first_step_s / r.before.cold.first_step_s)}, warm ${f(now.warm.first_step_s / r.before.warm.first_step_s)}` : ""}.`,
    "",
    "Where the time went (summary.json `startup`, medians, s):",
    "",
    "| run | config | python | local providers | connect | workers | ring | sync | first step | a worker's torch import | a worker's load |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ...["cold", "warm"].map((mode) => {
      const p = now[mode].phases_s;
      return `| now, ${mode} | ${["config", "python", "local_providers", "connect", "workers", "ring", "sync", "first_step"].map((k) => f(p[k])).join(" | ")} | ${f(now[mode].worker_import_s)} | ${f(now[mode].worker_load_s)} |`;
    }),
    "",
  ];
  return lines.join("\n");
}
