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
  const reporter = createReporter({ json: Boolean(options.json), name: loaded.config.name });
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
