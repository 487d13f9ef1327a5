/** Pick how `nimble provide` shows itself: JSON lines, the ink dashboard, or plain lines. */
import { ProvideJsonReporter, ProvidePlainReporter, type ProvideReporter } from "./providePlain.js";
import { reporterKind, type ReporterKindOptions } from "./reporter.js";

/** As for `nimble train`: the dashboard only on a terminal outside CI, and not with --quiet. */
export async function createProvideReporter(options: ReporterKindOptions): Promise<ProvideReporter> {
  const stream = options.stream ?? process.stdout;
  switch (reporterKind(options)) {
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
