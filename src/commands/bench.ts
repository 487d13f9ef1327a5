import { loadConfig, type LoadedConfig } from "../config/load.js";
import { checkPipelineWorkers } from "../config/parallelRules.js";
import { PURPOSE } from "../net/auth.js";
import { defaultKeyFile, loadIdentity } from "../identity/identity.js";
import { measurePeer, type PeerMeasurement } from "../net/peerBench.js";
import { prove } from "../identity/proof.js";
import { runHostBench, type HostBench } from "../runtime/hostBench.js";
import { runLayerProfile, type LayerProfile, type ProfiledLayer } from "../runtime/layerProfile.js";
import { resolvePython } from "../runtime/python.js";
import { localRequirements } from "../runtime/requirements.js";
import { describePlan, PlanError, planStages, type PipelinePlan } from "../schedule/stages.js";
import { alignColumns, formatBytes, formatCount } from "../ui/format.js";
import { pipelinePlanInput } from "../job/coordinator/pipelinePhases.js";

export interface BenchCommandOptions {
  peer?: string[];
  token?: string;
  key?: string;
  python?: string;
  torch?: string;
  device?: string;
  quick?: boolean;
  json?: boolean;
  /** --max-memory: each worker's limit the pipeline plan assumes (bytes; cli.ts parses the size). */
  maxMemory?: number;
}

/** A config with `parallel`: what the layer profile measured and how the stages would be planned. */
export interface PipelineBench {
  model: string;
  sequential: boolean;
  micro_batch: number;
  base_rss_bytes: number;
  stages: number;
  micro_batches: number;
  schedule: string;
  workers: number;
  /** Where the number of workers came from: local_workers, or one per provider of the list. */
  workers_from: "local_workers" | "providers";
  /** Each worker's memory limit the plan assumed (null: none). */
  max_memory_bytes: number | null;
  /** Why no plan came out (the planner's error), when none did. */
  plan_error?: string;
}

export interface BenchReport {
  host: HostBench;
  peers: PeerMeasurement[];
  /** With a config that has `parallel`: the layer profile, the stage plan (null when none fits) and its setting. */
  layers?: ProfiledLayer[];
  plan?: PipelinePlan | null;
  pipeline?: PipelineBench;
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
  // A pipeline config: its layers profiled and the stages planned for this host's workers.
  let planError: PlanError | undefined;
  let pipeline: Pick<BenchReport, "layers" | "plan" | "pipeline"> = {};
  if (loaded?.config.parallel) {
    if (!options.json) progress("profiling the task's layers for the pipeline plan ...");
    ({ error: planError, ...pipeline } = await benchPipeline(loaded, python.python, options.maxMemory ?? null, options.json ? undefined : progress));
  }
  const peers: PeerMeasurement[] = [];
  const identity = (options.peer ?? []).length > 0 ? await loadIdentity(options.key ?? defaultKeyFile(), { create: true }) : null;
  const token = options.token ?? process.env.NIMBLE_TOKEN;
  for (const address of options.peer ?? []) {
    if (!options.json) progress(`measuring the link to ${address} ...`);
    const hello = (binding: Buffer) => prove(identity!, PURPOSE.bench, binding, { token });
    peers.push(await measurePeer(address, hello, { bytes: options.quick ? 4 * 1024 * 1024 : undefined }));
  }
  const report: BenchReport = { host, peers, ...pipeline };
  process.stdout.write(options.json ? JSON.stringify(report) + "\n" : formatBenchReport(report));
  // The measurements are shown; a pipeline that cannot be planned is still the config's error (exit 2).
  if (planError) throw planError;
}

/**
 * Profile the task's layers (python -m nimble_worker.pipeline.profile) and plan the stages for
 * the workers the config would start here: local_workers of them (one per provider with a
 * providers list), each with `maxMemory` (--max-memory) or no limit, all of this host's speed.
 */
export async function benchPipeline(
  loaded: LoadedConfig,
  python: string,
  maxMemory: number | null,
  onLog?: (line: string) => void,
): Promise<Required<Pick<BenchReport, "layers" | "plan" | "pipeline">> & { error?: PlanError }> {
  const { config } = loaded;
  const parallel = config.parallel!;
  const workers = config.providers.length > 0 ? config.providers.length : config.local_workers;
  checkPipelineWorkers(config, workers);
  const siteDirs = await localRequirements(config.requirements, python, onLog ?? (() => {}));
  const replicas = workers / parallel.pipeline_stages;
  const profile = await runLayerProfile({ python, taskPath: loaded.taskPath, config: config as unknown as Record<string, unknown>, siteDirs, replicas, onLog });
  return { layers: profile.layers, ...planFromProfile(profile, config, workers, maxMemory, config.providers.length > 0 ? "providers" : "local_workers") };
}

/** The stage plan for `workers` alike workers from a layer profile (no I/O); a PlanError becomes plan_error (and `error`). */
export function planFromProfile(
  profile: LayerProfile,
  config: LoadedConfig["config"],
  workers: number,
  maxMemory: number | null,
  workersFrom: PipelineBench["workers_from"] = "local_workers",
): { plan: PipelinePlan | null; pipeline: PipelineBench; error?: PlanError } {
  const parallel = config.parallel!;
  const pipeline: PipelineBench = {
    model: profile.model,
    sequential: profile.sequential,
    micro_batch: profile.micro_batch,
    base_rss_bytes: profile.base_rss_bytes,
    stages: parallel.pipeline_stages,
    micro_batches: parallel.micro_batches,
    schedule: parallel.schedule,
    workers,
    workers_from: workersFrom,
    max_memory_bytes: maxMemory,
  };
  try {
    // The same input `nimble train` plans with (margins, checkpoints, evaluation included).
    const plan = planStages(pipelinePlanInput(config, profile, Array.from({ length: workers }, (_, rank) => ({ rank, memoryBytes: maxMemory, samplesPerS: 1 }))));
    return { plan, pipeline };
  } catch (err) {
    if (!(err instanceof PlanError)) throw err;
    return { plan: null, pipeline: { ...pipeline, plan_error: err.message }, error: err };
  }
}

/** The per-layer table shows this many rows (--json has them all). */
const MAX_LAYER_ROWS = 200;

/** The layer profile as a table, then the plan and why it is so. */
export function formatPipeline({ layers, plan, pipeline }: Pick<BenchReport, "layers" | "plan" | "pipeline">): string[] {
  if (!layers || !pipeline) return [];
  const lines: string[] = [];
  lines.push(`layers of ${pipeline.model}${pipeline.sequential ? "" : " (its top-level modules, in order)"}: micro-batch ${pipeline.micro_batch}, a worker's base ${formatBytes(pipeline.base_rss_bytes)}`);
  const rows = layers.slice(0, MAX_LAYER_ROWS).map((l, i) => [String(i), l.name, l.type, formatCount(l.params), formatBytes(l.activation_bytes), formatBytes(l.saved_bytes), (l.forward_backward_s * 1000).toFixed(2)]);
  const table = alignColumns(["#", "name", "type", "params", "activation", "saved", "ms"], rows, new Set([0, 3, 4, 5, 6]));
  for (const r of table) lines.push(`  ${r.join("  ").trimEnd()}`);
  if (layers.length > MAX_LAYER_ROWS) lines.push(`  ... and ${layers.length - MAX_LAYER_ROWS} more layers (--json lists them all)`);
  const replicas = pipeline.workers / pipeline.stages;
  const limit = pipeline.max_memory_bytes === null ? "no memory limit: --max-memory sets one" : `${formatBytes(pipeline.max_memory_bytes)} each`;
  lines.push(`pipeline plan: ${pipeline.stages} stage${pipeline.stages === 1 ? "" : "s"} x ${replicas} replica${replicas === 1 ? "" : "s"} over ${pipeline.workers} workers like this host${pipeline.workers_from === "providers" ? " (one per provider)" : ""} (${limit}), ${pipeline.micro_batches} micro-batches, ${pipeline.schedule}`);
  if (plan) {
    for (const l of describePlan(plan)) lines.push(`  ${l}`);
    lines.push("why");
    for (const w of plan.why) lines.push(`  - ${w}`);
  } else if (pipeline.plan_error) {
    lines.push(`  no plan: ${pipeline.plan_error}`);
  }
  return lines;
}

/** A measured figure with its unit, or "n/a" where the device has no such thing (host->device on a CPU). */
const num = (x: number | null | undefined, unit: string, digits = 1) => (x === null || x === undefined ? "n/a" : `${x.toFixed(digits)} ${unit}`);

export function formatBenchReport({ host, peers, ...pipeline }: BenchReport): string {
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
  lines.push(...formatPipeline(pipeline));
  for (const p of peers) {
    lines.push(`link to ${p.address}`);
    lines.push(`  round trip   median ${p.rtt_ms.median.toFixed(2)} ms (min ${p.rtt_ms.min.toFixed(2)}, max ${p.rtt_ms.max.toFixed(2)}, ${p.rtt_ms.samples} pings)`);
    lines.push(`  upload       ${formatBytes(p.upload_bytes_per_s)}/s (${formatBytes(p.upload_bytes)} sent)`);
  }
  return lines.join("\n") + "\n";
}
