import { statSync } from "node:fs";
import path from "node:path";
import { z } from "zod";
import { ConfigError, TaskFailed, UserError } from "../errors.js";
import { runPythonJson } from "./pythonJson.js";
import { PACKAGE_ROOT, PYTHON_RUNTIME_DIR } from "./paths.js";

/** A profile longer than this is not one (a model's layers, not its every tensor). */
export const MAX_PROFILE_LAYERS = 100_000;

const count = z.number().int().nonnegative().lte(Number.MAX_SAFE_INTEGER);
const seconds = z.number().finite().nonnegative();

export const layerProfileLayerSchema = z.object({
  name: z.string().max(1024),
  type: z.string().max(1024),
  params: count,
  param_bytes: count,
  /** The layer's output for one micro-batch (what crosses to the next stage). */
  activation_bytes: count,
  /** What its backward keeps from the forward, per micro-batch. */
  saved_bytes: count,
  /** One micro-batch's forward and backward through it, on this machine. */
  forward_backward_s: seconds,
});
export type ProfiledLayer = z.infer<typeof layerProfileLayerSchema>;

const layerProfileSchema = z.discriminatedUnion("ok", [
  z.object({
    ok: z.literal(true),
    /** Whether the model is an nn.Sequential (its children are the layers) or its top-level modules were taken in order. */
    sequential: z.boolean(),
    model: z.string().max(4096),
    micro_batch: z.number().int().positive().lte(Number.MAX_SAFE_INTEGER),
    /** A worker's resident memory before any layer: the planner's base. */
    base_rss_bytes: count,
    layers: z.array(layerProfileLayerSchema).max(MAX_PROFILE_LAYERS),
  }),
  z.object({ ok: z.literal(false), kind: z.enum(["task", "config"]), message: z.string(), where: z.string().optional(), field: z.string().optional() }),
]);
export type LayerProfile = Extract<z.infer<typeof layerProfileSchema>, { ok: true }>;

export interface LayerProfileOptions {
  python: string;
  taskPath: string;
  /** The validated job config (what the workers get). */
  config: Record<string, unknown>;
  /** Installed requirements (src/runtime/requirements.ts). */
  siteDirs?: string[];
  /** D: the replicas of each stage, so the profile's micro-batch is batch_size / D / micro_batches. */
  replicas?: number;
  onLog?: (line: string) => void;
}

/**
 * The task's model measured layer by layer on this machine (python -m
 * nimble_worker.pipeline.profile): each layer's parameters, activation and saved bytes and
 * forward + backward time for one micro-batch, for the stage planner (src/schedule/stages.ts).
 * A task error throws TaskFailed (exit 3), a config error ConfigError (exit 2).
 */
export async function runLayerProfile(opts: LayerProfileOptions): Promise<LayerProfile> {
  const args = ["-m", "nimble_worker.pipeline.profile", ...profileTaskArgs(opts.taskPath), ...(opts.siteDirs ?? []).flatMap((d) => ["--site-dir", d])];
  args.push("--config", JSON.stringify(opts.config));
  if (opts.replicas !== undefined) args.push("--replicas", String(opts.replicas));
  const env = { PATH: process.env.PATH ?? "/usr/bin:/bin", PYTHONPATH: PYTHON_RUNTIME_DIR, PYTHONDONTWRITEBYTECODE: "1", NIMBLE_HOME: PACKAGE_ROOT, NIMBLE_RANK: "0", NIMBLE_WORLD_SIZE: "1" };
  const { exitCode, last, stderrTail } = await runPythonJson(opts.python, args, env, opts.onLog);
  return layerProfileResult(last, exitCode, stderrTail);
}

/** The profile's last line, checked (every number finite, the list bounded), or the error it names. */
export function layerProfileResult(last: unknown, exitCode: number | undefined, stderrTail: string[]): LayerProfile {
  const parsed = layerProfileSchema.safeParse(last);
  if (!parsed.success) throw new UserError(`The layer profile failed (exit ${exitCode}): ${stderrTail.slice(-5).join("\n")}`);
  const r = parsed.data;
  if (r.ok) return r;
  if (r.kind === "task") throw new TaskFailed(`${r.where}: ${r.message}`, r.where, "The error is in the task file: fix it and run again (`nimble bench CONFIG` shows the layer profile).");
  throw new ConfigError(`${r.field}: ${r.message}`);
}

/** `--task FILE`, or for a task folder (a package) its task.py and `--package-dir FOLDER`. */
function profileTaskArgs(taskPath: string): string[] {
  return statSync(taskPath).isDirectory() ? ["--task", path.join(taskPath, "task.py"), "--package-dir", taskPath] : ["--task", taskPath];
}
