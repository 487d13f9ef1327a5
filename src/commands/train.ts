import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { loadConfig, parseOverride } from "../config/load.js";
import { UserError, errorMessage } from "../errors.js";
import { TaskFailed } from "../job/coordinator/errors.js";
import { runTraining } from "../job/coordinator/index.js";
import { dryRun } from "../runtime/dryRun.js";
import { localRequirements } from "../runtime/requirements.js";
import { resolvePython } from "../runtime/python.js";
import { createReporter, verbosityFromFlags } from "../ui/reporter.js";
import { RunLogReporter, TeeReporter } from "../ui/runLog.js";

export interface TrainCommandOptions {
  local?: number;
  python?: string;
  torch?: string;
  json?: boolean;
  resume?: string;
  key?: string;
  /** `--set field=value`, repeatable: overrides applied to the config before it is validated. */
  set?: string[];
  /** Validate, build the model and run one step on one local worker; no providers, no run folder. */
  dryRun?: boolean;
  /** commander's --no-sandbox: false runs the local providers' jobs unconfined. */
  sandbox?: boolean;
  quiet?: boolean;
  verbose?: boolean;
}

/** `nimble train CONFIG`: validate, run the job, report. Exit codes come from cli.ts. */
export async function trainCommand(configArg: string | undefined, options: TrainCommandOptions): Promise<void> {
  const { configPath, resume } = await resolveRun(configArg, options.resume);
  // Resuming runs the run directory's own copies of the config and task.
  const overrides = (options.set ?? []).map(parseOverride);
  const loaded = await loadConfig(configPath, { ...(resume ? { taskInDir: resume } : {}), overrides, ...(options.local !== undefined ? { localWorkers: options.local } : {}) });
  if (options.dryRun) {
    const python = await resolvePython({ python: options.python, torchSpec: options.torch, onProgress: (line) => process.stderr.write(`${line}\n`) });
    const log = (line: string) => process.stderr.write(`${line}\n`);
    const siteDirs = await localRequirements(loaded.config.requirements, python.python, log);
    const r = await dryRun({ python: python.python, taskPath: loaded.taskPath, config: loaded.config as unknown as Record<string, unknown>, siteDirs, onLog: log });
    if (options.json) process.stdout.write(`${JSON.stringify({ type: "dry_run", ...r })}\n`);
    else {
      process.stdout.write(
        `${configPath} is ready: ${r.model}; ${r.train_size} training and ${r.val_size} validation items; one step of ${r.batch_size} on ${r.device} ` +
          `(${r.micro_batches} micro-batch${r.micro_batches === 1 ? "" : "es"}): loss ${r.loss.toFixed(4)}${r.skipped ? " (skipped: not finite)" : ""}\n`,
      );
    }
    return;
  }
  if (resume) {
    const done = await finishedRun(resume, loaded.config.steps);
    if (done !== null) {
      process.stdout.write(`${resume} is a finished run: all ${done} of its ${loaded.config.steps} steps are done, so nothing was changed.\nTo train it further, resume with --set steps=N (N > ${done}).\n`);
      return;
    }
  }
  if (options.local !== undefined && loaded.config.providers.length > 0) {
    throw new UserError(`--local ${options.local} was given but ${configPath} names providers`, "Drop --local, or remove `providers` from the config to train on local providers.", 2);
  }
  const verbosity = verbosityFromFlags(options);
  // The terminal shows what the flags ask for; train.log in the run directory keeps everything.
  const reporter = new TeeReporter(await createReporter({ json: Boolean(options.json), name: loaded.config.name, verbosity }), new RunLogReporter());
  const controller = new AbortController();
  // First Ctrl-C cancels cleanly (providers stop their workers, the summary is written);
  // a second one exits at once.
  const onSignal = () => {
    if (controller.signal.aborted) process.exit(130);
    controller.abort();
  };
  // `on`, not `once`: execa's child cleanup (signal-exit) re-raises a signal that no other
  // listener is left to handle, which would kill this process before it cancels cleanly.
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  try {
    await runTraining({ loaded, local: options.local, python: options.python, torchSpec: options.torch, reporter, signal: controller.signal, resume, keyFile: options.key, sandbox: options.sandbox !== false });
  } catch (err) {
    const task = err instanceof TaskFailed ? { kind: err.kind, ...(err.where ? { where: err.where } : {}) } : {};
    reporter.handle({ type: "error", message: errorMessage(err), ...task });
    throw err;
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    reporter.close();
  }
}

/** The steps of a run that completed all of `steps` (its summary says so), or null. */
async function finishedRun(dir: string, steps: number): Promise<number | null> {
  let summary: unknown;
  try {
    summary = JSON.parse(await readFile(path.join(dir, "summary.json"), "utf8"));
  } catch {
    return null; // no summary (it was killed) or a damaged one: resuming is the way on
  }
  const s = summary as { status?: unknown; steps?: unknown };
  return s.status === "completed" && typeof s.steps === "number" && s.steps >= steps ? s.steps : null;
}

/** `nimble train CONFIG` or `nimble train --resume RUN_DIR` (whose config.yaml is used). */
async function resolveRun(configArg: string | undefined, resumeArg: string | undefined): Promise<{ configPath: string; resume?: string }> {
  if (!resumeArg) {
    if (!configArg) throw new UserError("nimble train needs a job config", "Run `nimble train CONFIG.yaml`, or `nimble train --resume RUN_DIR` to continue a run.", 2);
    return { configPath: configArg };
  }
  if (configArg) throw new UserError(`Both a config (${configArg}) and --resume ${resumeArg} were given`, "--resume uses the config saved in the run directory: drop the config argument.", 2);
  const resume = path.resolve(resumeArg);
  const configPath = path.join(resume, "config.yaml");
  if (!existsSync(configPath)) {
    throw new UserError(`${resumeArg} is not a run directory (no config.yaml in it)`, "Pass a folder that `nimble train` created under its output folder, e.g. runs/mnist-20261126-101500.", 2);
  }
  return { configPath, resume };
}
