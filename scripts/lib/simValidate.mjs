// bench-sim's validation: real runs of Nimble's ring among N = 2..8 ranks, one per network
// namespace of a WAN (scripts/lib/netns.mjs, prefix "nsim-"), uploads shaped with tc tbf and the
// one-way latency injected by the links themselves (as `nimble provide --latency` does; the
// kernel's netem is missing here). Each rank is scripts/sim-rank.mjs.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { ephemeralIdentity } from "../../dist/identity/identity.js";
import { ROOT } from "./args.mjs";
import { cannotMakeNamespaces, makeWan } from "./netns.mjs";
import { killGroups, median } from "./stats.mjs";

export const PREFIX = "nsim-";
const PORT = 7710;
const RUN_TIMEOUT_MS = 240_000;

const pem = (id) => id.privateKey.export({ format: "pem", type: "pkcs8" });

/** Start `size` ranks in the first `size` hosts; resolves when every /ring server listens. */
async function startRanks(wan, size, keysFile, children) {
  const hosts = wan.hosts.slice(0, size);
  const ips = hosts.map((h) => h.ip);
  const ranks = hosts.map((host, rank) => {
    const argv = [...wan.exec(host), process.execPath, path.join(ROOT, "scripts", "sim-rank.mjs")];
    const child = spawn(argv[0], argv.slice(1), {
      env: { ...process.env, SIM_RANK: JSON.stringify({ rank, size, ips, port: PORT, keysFile }) },
      stdio: ["pipe", "pipe", "inherit"],
      detached: true,
    });
    children.add(child);
    const queue = [];
    const waiters = [];
    createInterface({ input: child.stdout }).on("line", (line) => {
      let msg;
      try {
        msg = JSON.parse(line);
      } catch {
        return; // not ours
      }
      if (waiters.length) waiters.shift().resolve(msg);
      else queue.push(msg);
    });
    const failed = new Promise((_, reject) => child.once("exit", (code) => reject(new Error(`rank ${rank} exited (${code})`))));
    failed.catch(() => {});
    const next = (ms) =>
      Promise.race([
        queue.length ? Promise.resolve(queue.shift()) : new Promise((resolve) => waiters.push({ resolve })),
        failed,
        new Promise((_, reject) => setTimeout(() => reject(new Error(`rank ${rank}: no answer in ${ms} ms`)), ms).unref()),
      ]);
    return { child, next, send: (m) => child.stdin.write(`${JSON.stringify(m)}\n`) };
  });
  await Promise.all(ranks.map((r) => r.next(30_000)));
  return ranks;
}

/**
 * For each N in `sizes`, each RTT and each rate: per-op seconds of the ring at each byte count
 * (the median over `iters` ops of the slowest rank's time). Returns null (with why) when
 * namespaces cannot be made here.
 */
export async function validateRing({ sizes, rttsMs, ratesBits, bytes, iters, log = console.log }) {
  const why = cannotMakeNamespaces();
  if (why) return { skipped: why, rows: [] };
  const maxN = Math.max(...sizes);
  const wan = makeWan(Array.from({ length: maxN }, (_, i) => `r${i}`), { prefix: PREFIX });
  const dir = mkdtempSync(path.join(os.tmpdir(), "nimble-sim-"));
  const keysFile = path.join(dir, "keys.json");
  writeFileSync(keysFile, JSON.stringify({ coordinator: pem(ephemeralIdentity()), ranks: Array.from({ length: maxN }, () => pem(ephemeralIdentity())) }), { mode: 0o600 });
  const children = new Set();
  const rows = [];
  let failed = null;
  try {
    for (const n of sizes) {
      const ranks = await startRanks(wan, n, keysFile, children);
      for (const rttMs of rttsMs) {
        for (const rateBits of ratesBits) {
          wan.shape(rateBits, wan.hosts.slice(0, n));
          ranks.forEach((r) => r.send({ cmd: "run", latencyMs: rttMs / 2, sizes: bytes, iters }));
          const answers = await Promise.all(ranks.map((r) => r.next(RUN_TIMEOUT_MS)));
          ranks.forEach((r) => r.send({ cmd: "close" }));
          await Promise.all(ranks.map((r) => r.next(30_000)));
          bytes.forEach((b, i) => {
            const perOp = Array.from({ length: iters }, (_, k) => Math.max(...answers.map((a) => a.results[i].seconds[k])));
            const row = { n, rtt_ms: rttMs, rate_bits: rateBits, bytes: b, measured_s: median(perOp), load: os.loadavg()[0] };
            rows.push(row);
            log(`  measured ring N=${n} RTT ${rttMs} ms ${rateBits / 1e6} Mbit/s ${b} B: ${(row.measured_s * 1000).toFixed(1)} ms (load ${row.load.toFixed(1)})`);
          });
        }
      }
      ranks.forEach((r) => r.send({ cmd: "exit" }));
      await Promise.all(ranks.map((r) => new Promise((resolve) => (r.child.exitCode !== null ? resolve() : r.child.once("exit", resolve)))));
      for (const r of ranks) children.delete(r.child);
    }
  } catch (err) {
    // What was measured before stays.
    failed = String(err.message ?? err);
    log(`  validation stopped: ${failed}`);
  } finally {
    killGroups(children);
    wan.close();
    rmSync(dir, { recursive: true, force: true });
  }
  return { skipped: null, failed, rows };
}
