import { loadConfig } from "../config/load.js";
import { UserError, errorMessage } from "../errors.js";
import { runTraining } from "../job/coordinator.js";
import { createReporter } from "../ui/reporter.js";

export interface TrainCommandOptions {
  local?: number;
  python?: string;
  torch?: string;
  json?: boolean;
}

/** `nimble train CONFIG`: validate, run the job, report. Exit codes come from cli.ts. */
export async function trainCommand(configPath: string, options: TrainCommandOptions): Promise<void> {
  const loaded = await loadConfig(configPath);
  if (options.local !== undefined && loaded.config.providers.length > 0) {
    throw new UserError(`--local ${options.local} was given but ${configPath} names providers`, "Drop --local, or remove `providers` from the config to train on local providers.", 2);
  }
  const reporter = createReporter({ json: Boolean(options.json) });
  const controller = new AbortController();
  const onSignal = () => controller.abort();
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  try {
    await runTraining({ loaded, local: options.local, python: options.python, torchSpec: options.torch, reporter, signal: controller.signal });
  } catch (err) {
    reporter.handle({ type: "error", message: errorMessage(err) });
    throw err;
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    reporter.close();
  }
}
