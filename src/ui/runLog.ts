/**
 * The run's log file (`train.log` in the run directory): every status line, every step,
 * and every provider's and worker's output prefixed with its source, each line stamped
 * with the time. Written whatever `--quiet`/`--verbose` say on the terminal.
 */
import { appendFileSync } from "node:fs";
import path from "node:path";
import type { Reporter, TrainEvent } from "../job/events.js";
import { PlainReporter, type TextSink } from "./plain.js";

export const RUN_LOG = "train.log";

/** Lines before the run directory exists (starting providers, connecting) wait in memory. */
class TimestampedFileSink implements TextSink {
  private file: string | null = null;
  private pending: string[] = [];
  private partial = "";

  constructor(private readonly now: () => Date = () => new Date()) {}

  open(file: string): void {
    this.file = file;
    this.flush();
  }

  write(chunk: string): void {
    const parts = (this.partial + chunk).split("\n");
    this.partial = parts.pop() ?? "";
    const stamp = this.now().toISOString();
    for (const line of parts) this.pending.push(`${stamp} ${line}\n`);
    if (this.file) this.flush();
  }

  private flush(): void {
    if (!this.file || this.pending.length === 0) return;
    const text = this.pending.join("");
    this.pending = [];
    // Appended synchronously, line by line: a crash or process.exit loses nothing written.
    try {
      appendFileSync(this.file, text);
    } catch {
      // A log file that cannot be written must not stop training.
    }
  }
}

export class RunLogReporter implements Reporter {
  private readonly sink: TimestampedFileSink;
  private readonly lines: PlainReporter;

  constructor(options: { now?: () => Date } = {}) {
    this.sink = new TimestampedFileSink(options.now);
    this.lines = new PlainReporter({ out: this.sink, verbosity: "verbose" });
  }

  handle(event: TrainEvent): void {
    if (event.type === "run") {
      this.sink.open(path.join(event.run_dir, RUN_LOG));
      this.sink.write(`run directory ${event.run_dir}${event.resumed ? " (resumed)" : ""}\n`);
    }
    this.lines.handle(event);
  }

  close(): void {
    this.lines.close();
  }
}

/** One reporter that hands every event to each of several (the terminal and the log file). */
export class TeeReporter implements Reporter {
  private readonly reporters: Reporter[];

  constructor(...reporters: Reporter[]) {
    this.reporters = reporters;
  }

  handle(event: TrainEvent): void {
    for (const r of this.reporters) r.handle(event);
  }

  close(): void {
    for (const r of this.reporters) r.close();
  }
}
