/** Pick how `nimble train` shows progress: JSON lines, the ink view, or plain lines. */
import type { Reporter } from "../job/events.js";
import { JsonReporter } from "./json.js";
import { PlainReporter, type Verbosity } from "./plain.js";
import { InkReporter } from "./TrainView.js";

export interface CreateReporterOptions {
  /** `--json`: one JSON object per event. */
  json: boolean;
  /** Where progress goes. Default process.stdout. */
  stream?: NodeJS.WriteStream;
  /** Environment to consult (CI). Default process.env. */
  env?: NodeJS.ProcessEnv;
  /** Header for the live view, when known up front. */
  name?: string;
  runDir?: string;
  /** `--quiet` / `--verbose`. quiet shows no live view: warnings, errors and the summary only. */
  verbosity?: Verbosity;
}

export type ReporterKind = "json" | "ink" | "plain";

/** `CI` set to anything but "", "0" or "false" counts as set. */
export function isCI(env: NodeJS.ProcessEnv): boolean {
  const v = env.CI;
  return v !== undefined && v !== "" && v !== "0" && v.toLowerCase() !== "false";
}

export function reporterKind(options: CreateReporterOptions): ReporterKind {
  if (options.json) return "json";
  if (options.verbosity === "quiet") return "plain";
  const stream = options.stream ?? process.stdout;
  const env = options.env ?? process.env;
  return stream.isTTY === true && !isCI(env) ? "ink" : "plain";
}

export function createReporter(options: CreateReporterOptions): Reporter {
  const stream = options.stream ?? process.stdout;
  switch (reporterKind(options)) {
    case "json":
      return new JsonReporter({ out: stream });
    case "ink":
      return new InkReporter({ stdout: stream, name: options.name, runDir: options.runDir, verbose: options.verbosity === "verbose" });
    case "plain":
      return new PlainReporter({ out: stream, verbosity: options.verbosity });
  }
}
