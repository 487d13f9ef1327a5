// Gradient compression side by side: each example trained with the same steps, seed and
// workers under every codec, one real `nimble train` run each (local providers, real ring).
//
//   npm run bench:compression [-- --workers 2 --examples mnist,brown-charlm --out results/compression.json]
//
// Prints a table per example and writes JSON. steps/s counts the training loop only
// (sum of per-step times from metrics.jsonl), not worker start-up. "ratio (run)" is over
// the whole run, the plain start_step steps included; "ratio (per step)" is the last step's.
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { parse, stringify } from "yaml";
import { arg, ROOT as root } from "./lib/args.mjs";

const workers = Number(arg("workers", "2"));
const examples = arg("examples", "mnist,brown-charlm").split(",");
const out = path.resolve(root, arg("out", "results/compression.json"));

const METHODS = [
  { label: "none (f32)", compression: { method: "none" } },
  { label: "powersgd r1", compression: { method: "powersgd", rank: 1 } },
  { label: "powersgd r2", compression: { method: "powersgd", rank: 2 } },
  { label: "powersgd r4", compression: { method: "powersgd", rank: 4 } },
  { label: "powersgd r8", compression: { method: "powersgd", rank: 8 } },
  { label: "fp16", compression: { method: "fp16" } },
  { label: "int8", compression: { method: "int8" } },
  { label: "topk 1%", compression: { method: "topk", ratio: 0.01 } },
];

const tmp = mkdtempSync(path.join(os.tmpdir(), "nimble-bench-compression-"));
const results = [];
try {
  for (const example of examples) {
    const dir = path.join(root, "examples", example);
    const base = parse(readFileSync(path.join(dir, "nimble.yaml"), "utf8"));
    const metricName = example === "mnist" ? "accuracy" : "loss";
    const rows = [];
    for (const m of METHODS) {
      const config = {
        ...base,
        name: `${example}-${m.compression.method}`,
        task: path.join(dir, base.task),
        eval: { ...base.eval, every: 0 },
        checkpoint: { every: 0 },
        compression: m.compression,
        local_workers: workers,
        output: path.join(tmp, "runs"),
      };
      const file = path.join(tmp, `${example}-${m.label.replace(/\W+/g, "-")}.yaml`);
      writeFileSync(file, stringify(config));
      process.stderr.write(`${example}: ${m.label} ... `);
      const stdout = execFileSync(process.execPath, [path.join(root, "dist", "cli.js"), "train", file, "--json"], {
        encoding: "utf8",
        maxBuffer: 256 * 1024 * 1024,
        stdio: ["ignore", "pipe", "inherit"],
      });
      const done = stdout
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l))
        .find((e) => e.type === "done");
      const summary = JSON.parse(readFileSync(path.join(done.run_dir, "summary.json"), "utf8"));
      const steps = readFileSync(path.join(done.run_dir, "metrics.jsonl"), "utf8")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l));
      const loopSeconds = steps.reduce((a, s) => a + s.step_s, 0);
      // The last step: compression in steady state (after start_step's plain steps).
      const last = steps[steps.length - 1];
      const row = {
        method: m.label,
        compression: m.compression,
        steps: summary.steps,
        val_metric: metricName,
        val: summary.eval?.[metricName] ?? null,
        val_loss: summary.eval?.loss ?? null,
        final_train_loss: summary.final_loss,
        bytes_sent: summary.bytes_sent,
        uncompressed_bytes: summary.uncompressed_bytes,
        compression_ratio: summary.compression_ratio,
        step_ratio: last.uncompressed_bytes / last.bytes_sent,
        steps_per_s: summary.steps / loopSeconds,
        skipped: summary.steps_skipped.length,
      };
      rows.push(row);
      process.stderr.write(`${metricName} ${row.val?.toFixed(4)}  ${(row.bytes_sent / 1e6).toFixed(1)} MB  ${row.compression_ratio.toFixed(1)}x\n`);
    }
    results.push({ example, workers, metric: metricName, rows });
  }
} finally {
  rmSync(tmp, { recursive: true, force: true });
}

const cpu = os.cpus()[0]?.model ?? "cpu";
console.log(`\nGradient compression, ${workers} local workers, ${os.cpus().length}-core ${cpu}, ${new Date().toISOString().slice(0, 10)}`);
for (const r of results) {
  const ref = r.rows[0];
  console.log(`\n${r.example} (${r.rows[0].steps} steps)`);
  console.log(`| method | val ${r.metric} | vs none | MB sent | ratio (run) | ratio (per step) | steps/s |`);
  console.log("| --- | --- | --- | --- | --- | --- | --- |");
  for (const row of r.rows) {
    const delta =
      r.metric === "accuracy"
        ? `${((row.val - ref.val) * 100).toFixed(2)} pp`
        : `${(((row.val - ref.val) / ref.val) * 100).toFixed(2)} %`;
    console.log(
      `| ${row.method} | ${row.val.toFixed(4)} | ${delta} | ${(row.bytes_sent / 1e6).toFixed(2)} | ${row.compression_ratio.toFixed(1)}x | ${row.step_ratio.toFixed(1)}x | ${row.steps_per_s.toFixed(1)} |`,
    );
  }
}
mkdirSync(path.dirname(out), { recursive: true });
writeFileSync(out, JSON.stringify({ date: new Date().toISOString(), machine: { cpu, cores: os.cpus().length }, results }, null, 2));
console.log(`\nwrote ${path.relative(root, out)}`);
