import { z } from "zod";
import { UserError } from "../errors.js";
import { deviceSchema } from "../protocol/messages.js";
import { runPythonJson, taskArgs } from "./pythonJson.js";
import { PACKAGE_ROOT, PYTHON_RUNTIME_DIR } from "./paths.js";

const rate = z.number().finite().nonnegative();

export const hostBenchSchema = z.object({
  devices: z.array(deviceSchema.passthrough()).min(1),
  device: z.string(),
  matmul_gflops: z.object({ fp32: rate.nullable(), bf16: rate.nullable(), fp16: rate.nullable() }),
  memory_gbps: rate.nullable(),
  h2d_gbps: rate.nullable(),
  task: z
    .object({
      samples_per_s: z.record(z.string(), rate),
      max_micro_batch: z.number().int().positive(),
      best_micro_batch: z.number().int().positive(),
    })
    .optional(),
});
export type HostBench = z.infer<typeof hostBenchSchema>;

export interface HostBenchOptions {
  python: string;
  /** Measure this task's own training throughput too. */
  task?: { path: string; config: Record<string, unknown> };
  device?: string;
  /** Short measurements (tests). */
  quick?: boolean;
  onProgress?: (line: string) => void;
}

/** Measure this host with `python -m nimble_worker.bench`: devices, matmul, memory, the task. */
export async function runHostBench(opts: HostBenchOptions): Promise<HostBench> {
  const args = ["-m", "nimble_worker.bench"];
  if (opts.task) args.push(...taskArgs(opts.task.path), "--config", JSON.stringify(opts.task.config));
  if (opts.device) args.push("--device", opts.device);
  if (opts.quick) args.push("--quick");
  const env = { PATH: process.env.PATH ?? "/usr/bin:/bin", PYTHONPATH: [PYTHON_RUNTIME_DIR, process.env.PYTHONPATH].filter(Boolean).join(":"), NIMBLE_HOME: PACKAGE_ROOT };
  const { exitCode, last, stderrTail } = await runPythonJson(opts.python, args, env, opts.onProgress);
  const result = hostBenchSchema.safeParse(last);
  if (exitCode !== 0 || !result.success) {
    throw new UserError(`Measuring this host failed (exit ${exitCode}): ${stderrTail.slice(-5).join("\n")}`);
  }
  const parsed = result.data;
  return parsed;
}
