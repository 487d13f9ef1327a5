// Ring all-reduce bus bandwidth, Nimble against torch.distributed gloo in the same run.
// Every rank is a process of its own: Nimble's (scripts/bench-ring-rank.mjs) over TLS 1.3
// links made as providers make them, gloo's (scripts/bench_ring_gloo.py) over its TCP pairs.
// Each size runs in alternation (Nimble TLS, gloo, Nimble plain ws), `--reps` times; the
// figures are medians. Bus bandwidth is NCCL's: 2(N-1)/N * bytes / seconds, what each link
// carries per second. The plain-ws row is a reference only (every shipped link is TLS).
// Each side's CPU time per all-reduce (all N processes, user + system) is reported beside
// it: on a machine shared with other work, throughput follows the CPU share a side gets.
//
// Parts: `loopback` (127.0.0.1) and `shaped` (as root: one network namespace per rank,
// prefix "nring-", each upload shaped with tc tbf to --rate-mbit, default 1000).
//
//   npm run bench:ring -- [--parts loopback,shaped] [--sizes 1,4,16,64,256] [--shaped-sizes 64]
//       [--reps 5] [--label after] [--no-plain] [--prof DIR] [--codec f32] [--variants name:VAR=1,...]
import { spawn, execFileSync } from "node:child_process";
import { generateKeyPairSync } from "node:crypto";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { arg, CLI, flag, list, ROOT } from "./lib/args.mjs";
import { cannotMakeNamespaces, makeWan } from "./lib/netns.mjs";
import { ringMarkdown } from "./lib/ringReport.mjs";
import { killGroups, median } from "./lib/stats.mjs";

const N = Number(arg("world", "4"));
const parts = list("parts", "loopback");
const sizes = list("sizes", "1,4,16,64,256").map(Number);
const shapedSizes = list("shaped-sizes", "64").map(Number);
const reps = Number(arg("reps", "5"));
const label = arg("label", "after");
const rateMbit = Number(arg("rate-mbit", "1000"));
const codec = arg("codec", "f32");
const prof = arg("prof", "");
const withPlain = !flag("no-plain");
// Nimble TLS rows with extra environment, alternated with the rest: `name:VAR=value+VAR2=value,...`
// (e.g. scalar:NIMBLE_NO_WASM_SIMD=1 measures the SIMD kernels, js-mask:WS_NO_BUFFER_UTIL=1 bufferutil).
const variants = Object.fromEntries(
  list("variants", "").map((v) => {
    const [name, vars = ""] = v.split(":");
    return [name, Object.fromEntries(vars.split("+").filter(Boolean).map((kv) => [kv.slice(0, kv.indexOf("=")), kv.slice(kv.indexOf("=") + 1)]))];
  }),
);
const OP_TIMEOUT_MS = 180_000;
const children = new Set();
process.on("exit", () => killGroups(children));

/** Timed all-reduces per run: about 64 MiB of buffer per run, at least 2, at most 30. */
const itersFor = (mib) => Math.max(2, Math.min(30, Math.round(64 / mib)));

function python() {
  if (process.env.NIMBLE_PYTHON) return process.env.NIMBLE_PYTHON;
  return JSON.parse(execFileSync(process.execPath, [CLI, "env", "--json"], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] })).python;
}

/** A child speaking JSON lines; `next()` is its next line, bounded in time. */
function jsonChild(argv, what, env = {}) {
  const child = spawn(argv[0], argv.slice(1), { detached: true, stdio: ["pipe", "pipe", "inherit"], cwd: ROOT, env: { ...process.env, ...env } });
  children.add(child);
  const queue = [];
  const waiters = [];
  let ended = null;
  createInterface({ input: child.stdout }).on("line", (line) => {
    if (!line.startsWith("{")) return;
    const m = JSON.parse(line);
    if (waiters.length) waiters.shift().resolve(m);
    else queue.push(m);
  });
  child.once("exit", (code, signal) => {
    children.delete(child);
    ended = new Error(`${what} exited (${code ?? signal})`);
    for (const w of waiters.splice(0)) w.reject(ended);
  });
  return {
    send: (m) => child.stdin.write(`${JSON.stringify(m)}\n`),
    next: () =>
      new Promise((resolve, reject) => {
        if (queue.length) return resolve(queue.shift());
        if (ended) return reject(ended);
        const timer = setTimeout(() => reject(new Error(`${what}: no answer in ${OP_TIMEOUT_MS / 1000} s`)), OP_TIMEOUT_MS);
        waiters.push({ resolve: (m) => (clearTimeout(timer), resolve(m)), reject: (e) => (clearTimeout(timer), reject(e)) });
      }),
    exited: () => new Promise((r) => (ended ? r() : child.once("exit", r))),
  };
}

/** One side's N ranks: `run` has them all-reduce together and gives seconds per op (the slowest rank's). */
function group(ranks) {
  return {
    async run(elements, iters) {
      for (const r of ranks) r.send({ run: { elements, iters, codec } });
      const answers = await Promise.all(ranks.map((r) => r.next()));
      return {
        seconds: Math.max(...answers.map((a) => a.seconds)) / iters,
        // CPU time of all N processes per all-reduce: what a busy machine's throughput follows
        cpuSeconds: answers.reduce((t, a) => t + a.cpuSeconds, 0) / iters,
        correct: answers.every((a) => a.correct),
      };
    },
    async close() {
      for (const r of ranks) r.send({ exit: true });
      await Promise.all(ranks.map((r) => r.exited()));
    },
  };
}

async function startNimble(mode, hosts, env = {}) {
  const coordinatorPem = generateKeyPairSync("ed25519").privateKey.export({ format: "pem", type: "pkcs8" });
  const ranks = hosts.map((h, rank) => {
    const profArgs = prof && rank === 0 && mode === "tls" ? ["--cpu-prof", "--cpu-prof-dir", prof] : [];
    const argv = [process.execPath, ...profArgs, path.join(ROOT, "scripts", "bench-ring-rank.mjs"), "--rank", String(rank), "--world", String(N), "--mode", mode, "--host", h.ip];
    return jsonChild([...h.exec, ...argv], `nimble ${mode} rank ${rank}`, env);
  });
  const peers = await Promise.all(ranks.map((r) => r.next()));
  for (const r of ranks) r.send({ peers, coordinatorPem });
  await Promise.all(ranks.map((r) => r.next()));
  return group(ranks);
}

async function freePort() {
  const s = createServer();
  await new Promise((r) => s.listen(0, "127.0.0.1", r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

async function startGloo(hosts, PY) {
  const master = `${hosts[0].ip}:${hosts[0].exec.length ? 29500 : await freePort()}`;
  const ranks = hosts.map((h, rank) => {
    const ifname = h.ifname ? ["--ifname", h.ifname] : [];
    return jsonChild([...h.exec, PY, path.join(ROOT, "scripts", "bench_ring_gloo.py"), "--rank", String(rank), "--world", String(N), "--master", master, ...ifname], `gloo rank ${rank}`);
  });
  await Promise.all(ranks.map((r) => r.next()));
  return group(ranks);
}

/** Alternate the sides at each size, `reps` times; medians per side. */
async function measure(part, hosts, partSizes, PY) {
  const sides = { nimble: await startNimble("tls", hosts), gloo: await startGloo(hosts, PY) };
  if (withPlain) sides.plain = await startNimble("plain", hosts);
  for (const [name, env] of Object.entries(variants)) sides[name] = await startNimble("tls", hosts, env);
  const rows = [];
  for (const mib of partSizes) {
    const elements = Math.floor((mib * 1024 * 1024) / 4);
    const iters = itersFor(mib);
    const runs = Object.fromEntries(Object.keys(sides).map((k) => [k, []]));
    const cpu = Object.fromEntries(Object.keys(sides).map((k) => [k, []]));
    const loads = [];
    for (let rep = 0; rep < reps; rep++) {
      for (const [name, side] of Object.entries(sides)) {
        const r = await side.run(elements, iters);
        if (!r.correct) throw new Error(`${name} gave a wrong sum at ${mib} MiB`);
        runs[name].push(r.seconds);
        cpu[name].push(r.cpuSeconds);
      }
      loads.push(os.loadavg()[0]);
    }
    const bytes = elements * 4;
    const busbw = (s) => ((2 * (N - 1)) / N) * (bytes / s);
    const row = { part, mib, bytes, iters, reps, load: median(loads) };
    for (const [name, secs] of Object.entries(runs)) row[name] = { seconds: median(secs), busbw: busbw(median(secs)), runs: secs, cpuSeconds: median(cpu[name]) };
    row.ratio = row.nimble.busbw / row.gloo.busbw;
    // > 1: Nimble spends less CPU than gloo on the same all-reduce
    row.cpuRatio = row.gloo.cpuSeconds / row.nimble.cpuSeconds;
    if (part === "shaped") row.linkBytesPerS = (rateMbit * 1e6) / 8;
    rows.push(row);
    printRow(row);
  }
  for (const side of Object.values(sides)) await side.close();
  return rows;
}

function printRow(r) {
  const mb = (x) => (x / 1e6).toFixed(0).padStart(6);
  const link = r.linkBytesPerS ? `  nimble ${((100 * r.nimble.busbw) / r.linkBytesPerS).toFixed(0)}% / gloo ${((100 * r.gloo.busbw) / r.linkBytesPerS).toFixed(0)}% of the link` : "";
  const plain = r.plain ? `  plain ws ${mb(r.plain.busbw)} MB/s` : "";
  const extra = Object.keys(variants).map((v) => `  ${v} ${mb(r[v].busbw)} MB/s`).join("");
  console.log(`${r.part.padEnd(8)} ${String(r.mib).padStart(4)} MiB  nimble ${mb(r.nimble.busbw)} MB/s  gloo ${mb(r.gloo.busbw)} MB/s  ratio ${r.ratio.toFixed(2)}${plain}${extra}${link}  CPU s/op nimble ${r.nimble.cpuSeconds.toFixed(3)} gloo ${r.gloo.cpuSeconds.toFixed(3)}  load ${r.load.toFixed(2)}`);
}

const PY = python();
const loopbackHosts = Array.from({ length: N }, () => ({ ip: "127.0.0.1", exec: [] }));
console.log(`bench:ring: N = ${N}, ${os.cpus().length} cores (${os.cpus()[0]?.model ?? "cpu"}), codec ${codec}, ${reps} alternating runs per size, label "${label}"`);
const rows = [];
if (parts.includes("loopback")) rows.push(...(await measure("loopback", loopbackHosts, sizes, PY)));
if (parts.includes("shaped")) {
  const whyNot = cannotMakeNamespaces();
  if (whyNot) console.log(`shaped part skipped: ${whyNot}`);
  else {
    const wan = makeWan(Array.from({ length: N }, (_, i) => `r${i}`), { prefix: "nring-" });
    try {
      wan.shape(rateMbit * 1e6);
      const hosts = wan.hosts.map((h) => ({ ip: h.ip, ifname: h.ifname, exec: wan.exec(h) }));
      rows.push(...(await measure("shaped", hosts, shapedSizes, PY)));
    } finally {
      wan.close();
    }
  }
}

const jsonFile = path.join(ROOT, "results", "ring.json");
const all = existsSync(jsonFile) ? JSON.parse(readFileSync(jsonFile, "utf8")) : { runs: {} };
const prior = all.runs[label]?.rows ?? [];
// A run of some parts keeps the other parts' rows of the same label.
const kept = prior.filter((r) => !rows.some((n) => n.part === r.part));
all.runs[label] = { date: new Date().toISOString(), cores: os.cpus().length, cpu: os.cpus()[0]?.model ?? "", world: N, codec, rateMbit, rows: [...kept, ...rows] };
writeFileSync(jsonFile, `${JSON.stringify(all, null, 2)}\n`);
writeFileSync(path.join(ROOT, "results", "ring.md"), ringMarkdown(all));
console.log(`wrote results/ring.json and results/ring.md`);
process.exit(0);
