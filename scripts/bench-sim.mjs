// The collectives at scale, by simulation (src/collective/sim*.ts): ring, direct, recursive
// halving-doubling and two-level all-reduce for N up to 1024 at RTT 10 and 100 ms and link rates
// of 20 Mbit/s to 10 Gbit/s, each against the single-port lower bound
// alpha*ceil(log2 N) + 2(N-1)/N * bytes * beta, with software costs measured here first (Nimble's
// ring on loopback), then checked against real ring runs among N = 2..8 network namespaces.
//
//   npm run bench:sim [-- --n 4,8,...] [--rtt 10,100] [--rates 20e6,...] [--sizes 1024,...]
//                     [--costs FILE (the loopback runs of results/sim-costs.json again)] [--no-validate]
//                     [--validate-n 2,3,4,6,8] [--validate-iters 3] [--out results/sim]
//                     [--from results/sim.json (only write the report again)]
//                     [--grid-from results/sim.json (keep its grid, validate again)]
import { readFileSync, writeFileSync } from "node:fs";
import os from "node:os";
import { allReduceSchedule } from "../dist/collective/simSchedules.js";
import { simulate } from "../dist/collective/simEngine.js";
import { studyCell } from "../dist/collective/simStudy.js";
import { arg, flag, list } from "./lib/args.mjs";
import { costsFromSamples, measureSoftwareCosts } from "./lib/simCosts.mjs";
import { simChartSvg, simMarkdown } from "./lib/simReport.mjs";
import { validateRing } from "./lib/simValidate.mjs";

const KiB = 1024;
const MiB = 1024 * KiB;
const ns = list("n", "4,6,8,12,16,32,64,100,128,256,1024").map(Number);
const rtts = list("rtt", "10,100").map(Number);
const rates = list("rates", "20e6,100e6,1e9,10e9").map(Number);
const sizes = list("sizes", `${KiB},${64 * KiB},${MiB},${16 * MiB},${256 * MiB}`).map(Number);
const out = arg("out", "results/sim");
const started = Date.now();

// --from FILE: only write the report again from a results file.
if (arg("from", "")) {
  const results = JSON.parse(readFileSync(arg("from", ""), "utf8"));
  writeFileSync(`${out}.md`, simMarkdown(results));
  writeFileSync(`${out}.svg`, simChartSvg(results));
  console.log(`wrote ${out}.{md,svg} from ${arg("from", "")}`);
  process.exit(0);
}

// 1. Software costs.
let costs;
const costsFile = arg("costs", "");
if (costsFile) {
  const saved = JSON.parse(readFileSync(costsFile, "utf8")).costs;
  const { load, repeats, cores } = saved.measured;
  costs = costsFromSamples(saved.samples, { load, repeats, cores });
  console.log(`software costs from the runs in ${costsFile} (measured at load ${load})`);
} else {
  console.log("measuring software costs with Nimble's ring on loopback (TLS) ...");
  costs = measureSoftwareCosts();
  writeFileSync(`${out}-costs.json`, `${JSON.stringify({ costs }, null, 1)}\n`);
}
const sw = { ...costs.software, opS: costs.measured.op_fixed_s };
const us = (s) => `${(s * 1e6).toFixed(1)} us`;
console.log(
  `  per hop ${us(costs.measured.hop_s)}, per op ${us(costs.measured.op_fixed_s)}, per byte ${(costs.measured.ring_s_per_byte * 1e9).toFixed(2)} ns (${(1 / costs.measured.ring_s_per_byte / 1e6).toFixed(0)} MB/s; transport alone ${(1 / costs.measured.transport_s_per_byte / 1e6).toFixed(0)} MB/s)`,
);

// 2. The grid. Schedules are built once per (algorithm, N, size, group) and reused across links.
// --grid-from FILE: the grid of an earlier results file (to validate again only).
const gridFrom = arg("grid-from", "") ? JSON.parse(readFileSync(arg("grid-from", ""), "utf8")) : null;
const cells = gridFrom ? gridFrom.cells : [];
let gridSeconds = gridFrom?.grid_seconds ?? null;
for (const n of gridFrom ? [] : ns) {
  for (const bytes of sizes) {
    const cache = new Map();
    const scheduleOf = (a, n_, b, g) => {
      const key = `${a}/${g ?? ""}`;
      if (!cache.has(key)) cache.set(key, allReduceSchedule(a, n_, b, { groupSize: g }));
      return cache.get(key);
    };
    for (const rttMs of rtts) {
      for (const rateBits of rates) {
        const net = { alphaS: rttMs / 2000, betaSPerByte: 8 / rateBits };
        cells.push({ rtt_ms: rttMs, rate_bits: rateBits, ...studyCell(n, bytes, net, sw, scheduleOf) });
      }
    }
  }
  gridSeconds = (Date.now() - started) / 1000;
  const mine = cells.filter((c) => c.n === n);
  console.log(`  N=${n}: best within 2x of the bound in ${mine.filter((c) => c.ratio <= 2).length}/${mine.length} cells (${((Date.now() - started) / 1000).toFixed(0)} s)`);
}

const write = (validation) => {
  const results = {
    generated: new Date().toISOString(),
    machine: { cores: os.cpus().length, cpu: os.cpus()[0]?.model ?? "cpu", load_end: os.loadavg()[0] },
    settings: gridFrom ? gridFrom.settings : { n: ns, rtt_ms: rtts, rate_bits: rates, bytes: sizes },
    costs,
    cells,
    validation,
    seconds: (Date.now() - started) / 1000,
    grid_seconds: gridSeconds,
  };
  writeFileSync(`${out}.json`, `${JSON.stringify(results, null, 1)}\n`);
  writeFileSync(`${out}.md`, simMarkdown(results));
  writeFileSync(`${out}.svg`, simChartSvg(results));
  return results;
};
write({ skipped: "not run yet", rows: [] });

// 3. Validation against real rings in network namespaces.
let validation = { skipped: "--no-validate", rows: [] };
if (!flag("no-validate")) {
  console.log("validating against Nimble's ring in network namespaces (nsim-*) ...");
  const vBytes = [64 * KiB, 2 * MiB];
  try {
    validation = await validateRing({
      sizes: list("validate-n", "2,3,4,6,8").map(Number),
      rttsMs: [10, 100],
      ratesBits: [20e6, 200e6],
      bytes: vBytes,
      iters: Number(arg("validate-iters", "3")),
    });
  } catch (err) {
    console.error(`validation failed: ${err.message}`);
    validation = { skipped: `failed: ${err.message}`, rows: [] };
  }
  for (const row of validation.rows) {
    const net = { alphaS: row.rtt_ms / 2000, betaSPerByte: 8 / row.rate_bits };
    row.simulated_s = sw.opS + simulate(allReduceSchedule("ring", row.n, row.bytes), { ...net, ...costs.software }).seconds;
    row.error = row.simulated_s / row.measured_s - 1;
  }
  if (validation.skipped) console.log(`  skipped: ${validation.skipped}`);
}

const results = write(validation);
console.log(`\n${simMarkdown(results)}`);
console.log(`wrote ${out}.{json,md,svg} in ${results.seconds.toFixed(0)} s`);
