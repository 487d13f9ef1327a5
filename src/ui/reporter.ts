/** Pick how `nimble train` shows progress: JSON lines, the ink view, or plain lines. */
import { UserError } from "../errors.js";
import type { Reporter } from "../job/events.js";
import { JsonReporter } from "./json.js";
import { PlainReporter, type Verbosity } from "./plain.js";

/** What decides between JSON lines, a live view and plain lines (`nimble train` and `nimble provide`). */
export interface ReporterKindOptions {
  /** `--json`: one JSON object per event. */
  json: boolean;
  /** Where progress goes. Default process.stdout. */
  stream?: NodeJS.WriteStream;
  /** Environment to consult (CI). Default process.env. */
  env?: NodeJS.ProcessEnv;
  /** `--quiet` / `--verbose`. quiet shows no live view: warnings, errors and the summary only. */
  verbosity?: Verbosity;
}

export interface CreateReporterOptions extends ReporterKindOptions {
  /** Header for the live view, when known up front. */
  name?: string;
  runDir?: string;
}

/** `--quiet` and `--verbose` as one setting; both at once is a usage error. */
export function verbosityFromFlags(flags: { quiet?: boolean; verbose?: boolean }): Verbosity {
  if (flags.quiet && flags.verbose) throw new UserError("--quiet and --verbose were both given", "Pick one.", 2);
  return flags.quiet ? "quiet" : flags.verbose ? "verbose" : "normal";
}

export type ReporterKind = "json" | "ink" | "plain";

/** `CI` set to anything but "", "0" or "false" counts as set. */
export function isCI(env: NodeJS.ProcessEnv): boolean {
  const v = env.CI;
  return v !== undefined && v !== "" && v !== "0" && v.toLowerCase() !== "false";
}

/** The live view only on a terminal outside CI, and not with --quiet. */
export function reporterKind(options: ReporterKindOptions): ReporterKind {
  if (options.json) return "json";
  if (options.verbosity === "quiet") return "plain";
  const stream = options.stream ?? process.stdout;
  const env = options.env ?? process.env;
  return stream.isTTY === true && !isCI(env) ? "ink" : "plain";
}

export async function createReporter(options: CreateReporterOptions): Promise<Reporter> {
  const stream = options.stream ?? process.stdout;
  switch (reporterKind(options)) {
    case "json":
      return new JsonReporter({ out: stream });
    case "ink": {
      // ink and react load only for the live view: --json and plain output start without them.
      const { InkReporter } = await import("./TrainView.js");
      return new InkReporter({ stdout: stream, name: options.name, runDir: options.runDir, verbose: options.verbosity === "verbose" });
    }
    case "plain":
      // The command prints the error itself (once, with its hint, on stderr).
      return new PlainReporter({ out: stream, verbosity: options.verbosity, errors: false });
  }
}
