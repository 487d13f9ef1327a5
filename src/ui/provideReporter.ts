/** Pick how `nimble provide` shows itself: JSON lines, the ink dashboard, or plain lines. */
import { ProvideJsonReporter, ProvidePlainReporter, type ProvideReporter, type ProvideVerbosity } from "./providePlain.js";
import { isCI, type ReporterKind } from "./reporter.js";

export interface ProvideReporterOptions {
  /** `--json`: one JSON object per event. */
  json: boolean;
  verbosity: ProvideVerbosity;
  /** Default process.stdout. */
  stream?: NodeJS.WriteStream;
  /** Environment to consult (CI). Default process.env. */
  env?: NodeJS.ProcessEnv;
}

/** As for `nimble train`: the dashboard only on a terminal outside CI, and not with --quiet. */
export function provideReporterKind(options: ProvideReporterOptions): ReporterKind {
  if (options.json) return "json";
  if (options.verbosity === "quiet") return "plain";
  const stream = options.stream ?? process.stdout;
  return stream.isTTY === true && !isCI(options.env ?? process.env) ? "ink" : "plain";
}

export async function createProvideReporter(options: ProvideReporterOptions): Promise<ProvideReporter> {
  const stream = options.stream ?? process.stdout;
  switch (provideReporterKind(options)) {
    case "json":
      return new ProvideJsonReporter(stream);
    case "ink": {
      // Loaded only here: JSON and plain providers (managed ones among them) skip ink and react.
      const { InkProvideReporter } = await import("./ProvideView.js");
      return new InkProvideReporter({ stdout: stream, verbose: options.verbosity === "verbose" });
    }
    case "plain":
      return new ProvidePlainReporter({ out: stream, verbosity: options.verbosity });
  }
}
