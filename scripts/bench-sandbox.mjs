// A job's start-up time and steps/s with and without confinement, side by side: the MNIST
// example on 2 local providers that `nimble train` starts itself, confined (bubblewrap,
// the default) and with --no-sandbox, in alternation. Start-up is from `nimble train`
// starting to its first step's report; steps/s is over the steps after the first.
//
//   npm run build && node scripts/bench-sandbox.mjs [--runs 3] [--steps 40] [--json FILE]
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { stringify } from "yaml";
import { arg, CLI as cli, ROOT as root } from "./lib/args.mjs";

const runs = Number(arg("runs", "3"));
const steps = Number(arg("steps", "40"));
const jsonOut = arg("json", "");
const tmp = mkdtempSync(path.join(os.tmpdir(), "nimble-bench-sandbox-"));
const config = path.join(tmp, "nimble.yaml");
writeFileSync(
  config,
  stringify({
    name: "sandbox-bench",
    task: path.join(root, "examples", "mnist", "task.py"),
    steps,
    batch_size: 64,
    optimizer: { name: "adam", lr: 0.002 },
    compression: { method: "none" },
    eval: { every: 0, samples: 200, batch_size: 200 },
    local_workers: 2,
    output: path.join(tmp, "runs"),
  }),
);

function once(confined) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(process.execPath, [cli, "train", config, "--json", ...(confined ? [] : ["--no-sandbox"])], { stdio: ["ignore", "pipe", "pipe"] });
    const stepsAt = [];
    let stderr = "";
    child.stderr.on("data", (d) => (stderr += d));
    createInterface({ input: child.stdout }).on("line", (line) => {
      try {
        const e = JSON.parse(line);
        if (e.type === "step") stepsAt.push(performance.now());
      } catch {
        // not an event
      }
    });
    child.once("exit", (code) => {
      if (code !== 0 || stepsAt.length < 2) return reject(new Error(`nimble train exited ${code}: ${stderr}`));
      resolve({ startup_s: (stepsAt[0] - t0) / 1000, steps_per_s: (stepsAt.length - 1) / ((stepsAt.at(-1) - stepsAt[0]) / 1000) });
    });
  });
}

const rows = { confined: [], unconfined: [] };
for (let i = 0; i < runs; i++) {
  for (const confined of [true, false]) rows[confined ? "confined" : "unconfined"].push(await once(confined));
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const summary = Object.fromEntries(Object.entries(rows).map(([k, v]) => [k, { startup_s: median(v.map((r) => r.startup_s)), steps_per_s: median(v.map((r) => r.steps_per_s)) }]));
console.log(`\nMNIST example, 2 local providers, ${steps} steps of 64, ${runs} alternating runs each, ${os.cpus().length} cores, load ${os.loadavg()[0].toFixed(2)}`);
console.log("                start-up s   steps/s   (medians; every run below)");
for (const [k, v] of Object.entries(summary)) {
  console.log(`${k.padEnd(14)} ${v.startup_s.toFixed(2).padStart(10)}   ${v.steps_per_s.toFixed(1).padStart(7)}   ${rows[k].map((r) => `${r.startup_s.toFixed(2)}s/${r.steps_per_s.toFixed(1)}`).join(" ")}`);
}
console.log(`confined / unconfined: start-up ${(summary.confined.startup_s / summary.unconfined.startup_s).toFixed(2)}x, steps/s ${(summary.confined.steps_per_s / summary.unconfined.steps_per_s).toFixed(2)}x`);
if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ steps, runs, rows, summary }, null, 2));
rmSync(tmp, { recursive: true, force: true });
