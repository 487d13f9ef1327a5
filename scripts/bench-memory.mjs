// Memory footprint against torch DDP: peak proportional set size (PSS) of a whole job.
//
// A 50M-parameter MLP (scripts/bench_memory_task.py: 12 x Linear(2048, 2048), SGD, plain
// float32 all-reduce) trained on 2 local workers the way `nimble train` runs with no
// providers named (2 local providers it starts itself, confined by bubblewrap where it can,
// the default), against torch DDP (gloo, 2 processes, scripts/ddp_memory.py: the same
// model, batch and steps), in alternation. Every ~100 ms the PSS of every process of the
// run is read from /proc/<pid>/smaps_rollup and summed: for Nimble the coordinator CLI,
// the providers, the workers and the rest it starts (bwrap, sh, interpreter probes: "others");
// for DDP its 2 ranks. PSS
// counts a page shared by k processes as 1/k in each, so the sum is the memory the job
// holds (libraries mapped by several processes count once). The peak of that sum is a
// run's figure; medians over the runs are compared.
//
//   npm run bench:memory [-- --runs 3 --steps 10 --batch 32 --label after --json results/memory.json --md results/memory.md]
//
// Results are kept per --label in the JSON file (other labels are kept as they are), so the
// figures of an earlier build ("before") stay beside the current ones.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { execFileSync } from "node:child_process";
import { stringify } from "yaml";
import { arg, flag, CLI as cli, ROOT as root } from "./lib/args.mjs";
import { killGroups, median } from "./lib/stats.mjs";

const runs = Number(arg("runs", "3"));
const steps = Number(arg("steps", "10"));
const batch = Number(arg("batch", "32"));
const width = Number(arg("width", "2048"));
const layers = Number(arg("layers", "12"));
const label = arg("label", "after");
const jsonOut = arg("json", path.join(root, "results", "memory.json"));
const mdOut = arg("md", path.join(root, "results", "memory.md"));
const intervalMs = Number(arg("interval-ms", "100"));
const noSandbox = flag("no-sandbox");
const only = arg("only", ""); // "nimble" or "ddp": one side only (diagnosis)
const TASK = path.join(root, "scripts", "bench_memory_task.py");
const tmp = mkdtempSync(path.join(os.tmpdir(), "nimble-bench-memory-"));
const children = new Set();
const params = layers * (width * width + width);

function python() {
  if (process.env.NIMBLE_PYTHON) return process.env.NIMBLE_PYTHON;
  const out = execFileSync(process.execPath, [cli, "env", "--json"], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
  return JSON.parse(out).python;
}
const PY = python();

const config = path.join(tmp, "nimble.yaml");
writeFileSync(
  config,
  stringify({
    name: "memory-bench",
    task: TASK,
    task_args: { width, layers },
    steps,
    batch_size: batch,
    optimizer: { name: "sgd", lr: 0.01 },
    lr_schedule: { name: "constant" },
    compression: { method: "none" },
    balance: "equal",
    eval: { every: 0, samples: 64, batch_size: 64 },
    local_workers: 2,
    output: path.join(tmp, "runs"),
  }),
);

// ---- /proc ------------------------------------------------------------------------------
/** pid -> parent pid of every process now. */
function parents() {
  const out = new Map();
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      // The command may hold spaces and parentheses: the fields follow its last ')'.
      const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      out.set(Number(name), Number(rest[1]));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/** The roots and every descendant of them. */
function tree(roots) {
  const ppid = parents();
  const kids = new Map();
  for (const [pid, pp] of ppid) kids.set(pp, [...(kids.get(pp) ?? []), pid]);
  const seen = new Set();
  const stack = roots.filter((r) => ppid.has(r));
  while (stack.length) {
    const p = stack.pop();
    if (seen.has(p)) continue;
    seen.add(p);
    stack.push(...(kids.get(p) ?? []));
  }
  return [...seen];
}

/** PSS and RSS of a process in bytes (null once it is gone). */
function memoryOf(pid) {
  try {
    const text = readFileSync(`/proc/${pid}/smaps_rollup`, "utf8");
    const kb = (key) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? 0) * 1024;
    return { pss: kb("Pss"), rss: kb("Rss") };
  } catch {
    return null;
  }
}

const cmdlines = new Map();
function roleOf(pid) {
  let cmd = cmdlines.get(pid);
  if (cmd === undefined) {
    try {
      cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean);
    } catch {
      cmd = [];
    }
    // A process execs (sh -> bwrap -> python): remember only what it finally is.
    if (cmd.some((a) => a === "nimble_worker" || a.endsWith("ddp_memory.py"))) cmdlines.set(pid, cmd);
  }
  if (cmd.includes("nimble_worker")) return "workers";
  if (cmd.some((a) => a.endsWith("ddp_memory.py"))) return "ranks";
  if (cmd.includes("provide")) return "providers";
  if (cmd.includes("train")) return "coordinator";
  return "others"; // bwrap and sh around a worker, interpreter probes
}

/**
 * Sample the tree under `roots` every intervalMs until stop(): the peak of the summed PSS,
 * each role's part at that moment, each role's own peak, and what the job was doing then.
 */
function sampler(roots, phase = () => "") {
  let peak = { pss: 0, rss: 0, at_s: 0, phase: "", roles: {} };
  const rolePeaks = {};
  const t0 = performance.now();
  let samples = 0;
  const tick = () => {
    const roles = {};
    let pss = 0;
    let rss = 0;
    for (const pid of tree(roots)) {
      const m = memoryOf(pid);
      if (!m) continue;
      const role = roleOf(pid);
      roles[role] = (roles[role] ?? 0) + m.pss;
      pss += m.pss;
      rss += m.rss;
    }
    samples += 1;
    for (const [role, v] of Object.entries(roles)) rolePeaks[role] = Math.max(rolePeaks[role] ?? 0, v);
    if (pss > peak.pss) peak = { pss, rss, at_s: (performance.now() - t0) / 1000, phase: phase(), roles };
  };
  const timer = setInterval(tick, intervalMs);
  tick();
  return () => {
    clearInterval(timer);
    tick();
    return { peak_pss: peak.pss, peak_rss: peak.rss, peak_at_s: peak.at_s, peak_phase: peak.phase, at_peak: peak.roles, role_peaks: rolePeaks, samples, seconds: (performance.now() - t0) / 1000 };
  };
}

function start(file, args, opts = {}) {
  // Its own process group, so that whatever it starts can be killed with it.
  const child = spawn(file, args, { detached: true, stdio: ["ignore", "pipe", "pipe"], ...opts });
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}

// ---- one run of each ----------------------------------------------------------------------
function nimble() {
  return new Promise((resolve, reject) => {
    const child = start(process.execPath, [cli, "train", config, "--json", "--python", PY, ...(noSandbox ? ["--no-sandbox"] : [])]);
    let phase = "start";
    let stderr = "";
    let done = null;
    child.stderr.on("data", (d) => (stderr = (stderr + d).slice(-4000)));
    createInterface({ input: child.stdout }).on("line", (line) => {
      try {
        const e = JSON.parse(line);
        if (e.type === "step") phase = `step ${e.step}`;
        else if (e.type === "eval" || e.type === "checkpoint") phase = `${e.type} after step ${e.step}`;
        else if (e.type === "status" && /weights|sync/i.test(e.message)) phase = e.message.slice(0, 60);
        else if (e.type === "done") done = e;
      } catch {
        // not an event
      }
    });
    const stop = sampler([child.pid], () => phase);
    child.once("exit", (code) => {
      const figures = stop();
      if (code !== 0 || !done) return reject(new Error(`nimble train exited ${code}: ${stderr}`));
      const summary = JSON.parse(readFileSync(path.join(done.run_dir, "summary.json"), "utf8"));
      resolve({ ...figures, final_loss: summary.final_loss ?? summary.loss ?? null });
    });
  });
}

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function ddp() {
  const port = await freePort();
  const threads = String(Math.max(1, Math.floor(os.cpus().length / 2)));
  const ranks = [0, 1].map((rank) =>
    start(PY, [path.join(root, "scripts", "ddp_memory.py"), "--task", TASK, "--rank", String(rank), "--world", "2", "--master", `127.0.0.1:${port}`, "--steps", String(steps), "--batch-size", String(batch), "--threads", threads, ...(rank === 0 ? ["--save", path.join(tmp, "ddp-model.pt")] : [])]),
  );
  const stop = sampler(ranks.map((c) => c.pid), () => "");
  const outs = ranks.map((c) => {
    let text = "";
    c.stdout.on("data", (d) => (text += d));
    c.stderr.on("data", (d) => (text = (text + d).slice(-4000)));
    return new Promise((resolve) => c.once("exit", (code) => resolve({ code, text })));
  });
  const ended = await Promise.all(outs);
  const figures = stop();
  if (ended.some((e) => e.code !== 0)) throw new Error(`DDP failed: ${ended.map((e) => e.text).join("\n")}`);
  return figures;
}

// ---- the runs -----------------------------------------------------------------------------
process.on("SIGINT", () => {
  killGroups(children);
  process.exit(130);
});
const rows = { nimble: [], ddp: [] };
const gb = (b) => (b / 1e9).toFixed(2);
console.log(`${params.toLocaleString()} parameters (${layers} x Linear(${width}, ${width})), ${steps} steps of ${batch}, 2 workers, ${runs} alternating runs, ${os.cpus().length} cores`);
for (let i = 0; i < runs; i++) {
  for (const side of i % 2 === 0 ? ["nimble", "ddp"] : ["ddp", "nimble"]) {
    if (only && side !== only) continue;
    const r = side === "nimble" ? await nimble() : await ddp();
    rows[side].push(r);
    const parts = Object.entries(r.at_peak).map(([k, v]) => `${k} ${gb(v)}`).join(", ");
    console.log(`run ${i + 1} ${side.padEnd(6)} peak PSS ${gb(r.peak_pss)} GB (RSS ${gb(r.peak_rss)}) at ${r.peak_at_s.toFixed(1)} s${r.peak_phase ? ` [${r.peak_phase}]` : ""}: ${parts}`);
  }
}
killGroups(children);
rmSync(tmp, { recursive: true, force: true });

const summarise = (list) =>
  list.length === 0
    ? null
    : {
        peak_pss: median(list.map((r) => r.peak_pss)),
        peak_rss: median(list.map((r) => r.peak_rss)),
        role_peaks: Object.fromEntries([...new Set(list.flatMap((r) => Object.keys(r.role_peaks)))].map((k) => [k, median(list.map((r) => r.role_peaks[k] ?? 0))])),
      };
const result = {
  date: new Date().toISOString(),
  commit: (() => {
    try {
      const head = execFileSync("git", ["rev-parse", "--short", "HEAD"], { cwd: root, encoding: "utf8" }).trim();
      const dirty = execFileSync("git", ["status", "--porcelain", "--untracked-files=no"], { cwd: root, encoding: "utf8" }).trim() !== "";
      return dirty ? `${head}-dirty` : head;
    } catch {
      return null;
    }
  })(),
  setup: { params, width, layers, steps, batch, workers: 2, sandbox: !noSandbox, cores: os.cpus().length, interval_ms: intervalMs },
  nimble: summarise(rows.nimble),
  ddp: summarise(rows.ddp),
  runs: rows,
};
result.ratio = result.nimble && result.ddp ? result.nimble.peak_pss / result.ddp.peak_pss : null;
if (result.ratio !== null) console.log(`\nmedian peak PSS: nimble ${gb(result.nimble.peak_pss)} GB, DDP ${gb(result.ddp.peak_pss)} GB: ${result.ratio.toFixed(2)}x`);

if (!only) {
  const all = existsSync(jsonOut) ? JSON.parse(readFileSync(jsonOut, "utf8")) : {};
  all[label] = result;
  writeFileSync(jsonOut, `${JSON.stringify(all, null, 2)}\n`);
  writeFileSync(mdOut, markdown(all));
  console.log(`wrote ${path.relative(root, jsonOut)} (${label}) and ${path.relative(root, mdOut)}`);
}

function markdown(all) {
  const lines = ["# Memory footprint against torch DDP", "", "`npm run bench:memory` (scripts/bench-memory.mjs): peak PSS summed over every process of the job, sampled every ~100 ms; medians of alternating runs.", ""];
  for (const [name, r] of Object.entries(all)) {
    if (!r?.nimble || !r?.ddp) continue;
    const s = r.setup;
    lines.push(`## ${name} (${r.commit ?? "?"}, ${r.date.slice(0, 10)})`, "");
    lines.push(`${s.params.toLocaleString("en-US")} parameters (${s.layers} x Linear(${s.width}, ${s.width})), SGD, ${s.steps} steps of ${s.batch}, ${s.workers} workers, ${s.sandbox ? "confined (bubblewrap)" : "--no-sandbox"}, ${r.runs.nimble.length} runs each, ${s.cores} cores.`, "");
    lines.push("| | peak PSS | peak RSS | vs DDP |", "| --- | ---: | ---: | ---: |");
    lines.push(`| Nimble | ${gb(r.nimble.peak_pss)} GB | ${gb(r.nimble.peak_rss)} GB | ${r.ratio.toFixed(2)}x |`);
    lines.push(`| DDP (gloo) | ${gb(r.ddp.peak_pss)} GB | ${gb(r.ddp.peak_rss)} GB | 1.00x |`, "");
    const roles = Object.entries(r.nimble.role_peaks).sort((a, b) => b[1] - a[1]);
    lines.push(`Nimble's processes, each role's own peak (summed over its processes; medians): ${roles.map(([k, v]) => `${k} ${(v / 1e6).toFixed(0)} MB`).join(", ")}.`, "");
    lines.push(`Every run: Nimble ${r.runs.nimble.map((x) => `${gb(x.peak_pss)}${x.peak_phase ? ` [${x.peak_phase}]` : ""}`).join(", ")}; DDP ${r.runs.ddp.map((x) => gb(x.peak_pss)).join(", ")} GB.`, "");
  }
  return `${lines.join("\n")}\n`;
}
