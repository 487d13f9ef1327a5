import { z } from "zod";
import { ConfigError, TaskFailed, UserError } from "../errors.js";
import { runPythonJson, taskArgs } from "./pythonJson.js";
import { PACKAGE_ROOT, PYTHON_RUNTIME_DIR } from "./paths.js";

const dryRunSchema = z.discriminatedUnion("ok", [
  z.object({ ok: z.literal(true), model: z.string(), params: z.number(), train_size: z.number(), val_size: z.number(), loss: z.number(), batch_size: z.number(), micro_batches: z.number(), device: z.string(), skipped: z.boolean() }).passthrough(),
  z.object({ ok: z.literal(false), kind: z.enum(["task", "config"]), message: z.string(), where: z.string().optional(), field: z.string().optional() }),
]);
export type DryRun = Extract<z.infer<typeof dryRunSchema>, { ok: true }>;

/**
 * `nimble train --dry-run`: the task loaded, its datasets and model built and one step's
 * forward and backward run by one local worker (python -m nimble_worker.dryrun), no
 * providers and no run folder. A task error throws TaskFailed (exit 3).
 */
export async function dryRun(opts: { python: string; taskPath: string; config: Record<string, unknown>; siteDirs?: string[]; onLog?: (line: string) => void }): Promise<DryRun> {
  const task = [...taskArgs(opts.taskPath), ...(opts.siteDirs ?? []).flatMap((d) => ["--site-dir", d])];
  const env = { PATH: process.env.PATH ?? "/usr/bin:/bin", PYTHONPATH: PYTHON_RUNTIME_DIR, PYTHONDONTWRITEBYTECODE: "1", NIMBLE_HOME: PACKAGE_ROOT, NIMBLE_RANK: "0", NIMBLE_WORLD_SIZE: "1" };
  const { exitCode, last, stderrTail } = await runPythonJson(opts.python, ["-m", "nimble_worker.dryrun", ...task, "--config", JSON.stringify(opts.config)], env, opts.onLog);
  const parsed = dryRunSchema.safeParse(last);
  if (!parsed.success) throw new UserError(`The dry run failed (exit ${exitCode}): ${stderrTail.slice(-5).join("\n")}`);
  const r = parsed.data;
  if (r.ok) return r;
  if (r.kind === "task") throw new TaskFailed(`${r.where}: ${r.message}`, r.where, "The error is in the task file: fix it and run `nimble train --dry-run` again.");
  throw new ConfigError(`${r.field}: ${r.message}`);
}
