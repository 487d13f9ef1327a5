import { loadConfig } from "../config/load.js";
import { PURPOSE } from "../net/auth.js";
import { defaultKeyFile, loadIdentity } from "../identity/identity.js";
import { measurePeer, type PeerMeasurement } from "../net/peerBench.js";
import { prove } from "../identity/proof.js";
import { runHostBench, type HostBench } from "../runtime/hostBench.js";
import { resolvePython } from "../runtime/python.js";
import { formatBytes } from "../ui/format.js";

export interface BenchCommandOptions {
  peer?: string[];
  token?: string;
  key?: string;
  python?: string;
  torch?: string;
  device?: string;
  quick?: boolean;
  json?: boolean;
}

export interface BenchReport {
  host: HostBench;
  peers: PeerMeasurement[];
}

/** `nimble bench [config.yaml]`: measure this host (and the task, and links to --peer providers). */
export async function benchCommand(configPath: string | undefined, options: BenchCommandOptions): Promise<void> {
  const progress = (line: string) => process.stderr.write(`${line}\n`);
  const loaded = configPath ? await loadConfig(configPath) : undefined;
  const python = await resolvePython({ python: options.python, torchSpec: options.torch, onProgress: progress });
  const host = await runHostBench({
    python: python.python,
    task: loaded ? { path: loaded.taskPath, config: loaded.config as unknown as Record<string, unknown> } : undefined,
    device: options.device,
    quick: options.quick,
    onProgress: options.json ? undefined : progress,
  });
  const peers: PeerMeasurement[] = [];
  const identity = (options.peer ?? []).length > 0 ? await loadIdentity(options.key ?? defaultKeyFile(), { create: true }) : null;
  const token = options.token ?? process.env.NIMBLE_TOKEN;
  for (const address of options.peer ?? []) {
    if (!options.json) progress(`measuring the link to ${address} ...`);
    const hello = (binding: Buffer) => prove(identity!, PURPOSE.bench, binding, { token });
    peers.push(await measurePeer(address, hello, { bytes: options.quick ? 4 * 1024 * 1024 : undefined }));
  }
  const report: BenchReport = { host, peers };
  process.stdout.write(options.json ? JSON.stringify(report) + "\n" : formatBenchReport(report));
}

/** A measured figure with its unit, or "n/a" where the device has no such thing (host->device on a CPU). */
const num = (x: number | null | undefined, unit: string, digits = 1) => (x === null || x === undefined ? "n/a" : `${x.toFixed(digits)} ${unit}`);

export function formatBenchReport({ host, peers }: BenchReport): string {
  const lines: string[] = [];
  lines.push("devices");
  for (const d of host.devices) {
    const mem = d.memory_bytes ? `  ${formatBytes(d.memory_bytes)}` : "";
    lines.push(`  ${d.id.padEnd(8)} ${d.name}${mem}${d.cores ? `  ${d.cores} cores` : ""}`);
  }
  lines.push(`measured on ${host.device}`);
  lines.push(`  matmul fp32   ${num(host.matmul_gflops.fp32, "GFLOP/s")}`);
  lines.push(`  matmul bf16   ${num(host.matmul_gflops.bf16, "GFLOP/s")}`);
  lines.push(`  matmul fp16   ${num(host.matmul_gflops.fp16, "GFLOP/s")}`);
  lines.push(`  memory        ${num(host.memory_gbps, "GB/s", 2)}`);
  lines.push(`  host->device  ${num(host.h2d_gbps, "GB/s", 2)}`);
  if (host.task) {
    lines.push("task training throughput (forward + backward)");
    for (const [size, rate] of Object.entries(host.task.samples_per_s)) lines.push(`  micro-batch ${size.padStart(5)}  ${rate.toFixed(1)} samples/s`);
    lines.push(`  best micro-batch ${host.task.best_micro_batch}, largest that fits ${host.task.max_micro_batch}`);
  }
  for (const p of peers) {
    lines.push(`link to ${p.address}`);
    lines.push(`  round trip   median ${p.rtt_ms.median.toFixed(2)} ms (min ${p.rtt_ms.min.toFixed(2)}, max ${p.rtt_ms.max.toFixed(2)}, ${p.rtt_ms.samples} pings)`);
    lines.push(`  upload       ${formatBytes(p.upload_bytes_per_s)}/s (${formatBytes(p.upload_bytes)} sent)`);
  }
  return lines.join("\n") + "\n";
}
