/** `--json`: every event, unthrottled, as one JSON object per line (JSON Lines). */
import type { Reporter, TrainEvent } from "../job/events.js";
import type { TextSink } from "./plain.js";

export interface JsonReporterOptions {
  /** Where lines go. Default process.stdout. */
  out?: TextSink;
}

export class JsonReporter implements Reporter {
  private readonly out: TextSink;
  private closed = false;

  constructor(options: JsonReporterOptions = {}) {
    this.out = options.out ?? process.stdout;
  }

  handle(event: TrainEvent): void {
    if (this.closed) return;
    this.out.write(JSON.stringify(event, jsonSafe) + "\n");
  }

  close(): void {
    this.closed = true;
  }
}

/** NaN and ±Infinity (a diverged loss) become strings, not JSON's silent null. */
function jsonSafe(_key: string, value: unknown): unknown {
  if (typeof value === "number" && !Number.isFinite(value)) return String(value);
  if (typeof value === "bigint") return Number(value);
  return value;
}
