// bench-sim's software costs, measured with Nimble's ring on loopback (scripts/bench-ring.mjs:
// ranks as threads, TLS 1.3 links with a hello, as providers link). Runs alternate and the
// figures are medians:
//   tiny buffers (a few floats) at N = 2: an op of 2 hops, each a send and a receive on a
//     member's CPU (N = 3 is recorded beside it);
//   16 MiB at N = 2, beside bench-ring's transport-only reference (the same bytes, no ring): per
//     byte, a send costs half the reference's, a receive the rest of the ring's (decode, sum).
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { ROOT } from "./args.mjs";
import { median } from "./stats.mjs";

function benchRing(dir, args) {
  const out = path.join(dir, "ring.json");
  execFileSync(process.execPath, [path.join(ROOT, "scripts", "bench-ring.mjs"), ...args, "--tls", "on", "--json", out], { stdio: ["ignore", "ignore", "inherit"], timeout: 180_000 });
  return JSON.parse(readFileSync(out, "utf8"));
}

const least = (xs) => Math.min(...xs);

export function measureSoftwareCosts({ repeats = 5, log = console.log } = {}) {
  const dir = mkdtempSync(path.join(os.tmpdir(), "nimble-simcosts-"));
  const tiny2 = [];
  const tiny3 = [];
  const large = [];
  const loads = [];
  try {
    for (let i = 0; i < repeats; i++) {
      loads.push(os.loadavg()[0]);
      const tiny = benchRing(dir, ["--sizes", "2,3", "--mb", "0.0001", "--iters", "300"]);
      tiny2.push(tiny.rows.find((r) => r.n === 2).ringSeconds);
      tiny3.push(tiny.rows.find((r) => r.n === 3).ringSeconds);
      const big = benchRing(dir, ["--sizes", "2", "--mb", "16", "--iters", "3"]).rows[0];
      large.push({ ring: big.ringSeconds, ref: big.refSeconds, bytes: big.bytesPerNode });
      log(`  loopback run ${i + 1}: tiny op N=2 ${(tiny2[i] * 1e6).toFixed(0)} us, N=3 ${(tiny3[i] * 1e6).toFixed(0)} us; 16 MiB N=2 ring ${big.ringSeconds.toFixed(3)} s, transport ${big.refSeconds.toFixed(3)} s (load ${loads[i].toFixed(1)})`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return costsFromSamples({ tiny_n2_s: tiny2, tiny_n3_s: tiny3, large_n2: large }, { load: median(loads), repeats, cores: os.cpus().length });
}

/**
 * The costs from the runs' samples. A tiny op at N = 2 is charged wholly to its two hops: on a
 * loaded 2-core machine the N = 3 op (three threads) waits for cores, and the difference
 * between the two, which would separate a per-op cost, is mostly that wait.
 */
export function costsFromSamples(samples, context) {
  const { tiny_n2_s: tiny2, tiny_n3_s: tiny3, large_n2: large } = samples;
  const fit = (pick) => {
    const t2 = pick(tiny2);
    const hop = t2 / 2;
    const bytes = large[0].bytes;
    const ringPerByte = Math.max(0, (pick(large.map((l) => l.ring)) - t2) / bytes);
    const transportPerByte = pick(large.map((l) => l.ref)) / bytes;
    return { tiny_op_n2_s: t2, tiny_op_n3_s: pick(tiny3), hop_s: hop, op_fixed_s: 0, ring_s_per_byte: ringPerByte, transport_s_per_byte: transportPerByte };
  };
  const m = fit(least);
  const sendSPerByte = Math.min(m.transport_s_per_byte / 2, m.ring_s_per_byte / 2);
  return {
    software: { sendMessageS: m.hop_s / 2, recvMessageS: m.hop_s / 2, sendSPerByte, recvSPerByte: m.ring_s_per_byte - sendSPerByte },
    measured: { ...m, medians: fit(median), ...context },
    samples,
  };
}
