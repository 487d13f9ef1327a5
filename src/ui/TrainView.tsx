/** The live terminal view of `nimble train`, and the Reporter that drives it. */
import { Box, render, Text, type Instance } from "ink";
import type { Reporter, TrainEvent, WorkerRow, WorkerState } from "../job/events.js";
import {
  estimateEta,
  formatBytes,
  formatCount,
  formatDuration,
  formatMetric,
  formatRate,
  formatRatio,
  formatSci,
  progressBar,
  sparkline,
} from "./format.js";
import { formatDiloco, formatMetrics } from "./plain.js";
import { formatPipelineRows } from "./pipeline.js";
import { initialViewState, reduceView, type TrainViewState } from "./state.js";
import { StateTable } from "./StateTable.js";
import { Throttle } from "./throttle.js";

export { initialViewState, reduceView, type TrainViewState } from "./state.js";

const STATE_COLOR: Record<WorkerState, string> = {
  starting: "yellow",
  joining: "cyan",
  training: "green",
  "left out": "magenta",
  lost: "red",
  done: "gray",
  failed: "red",
};

const COLUMNS = ["worker", "device", "state", "share", "samples", "compute", "comm", "idle", "MB sent"] as const;
const RIGHT = new Set([3, 4, 5, 6, 7, 8]);

function workerCells(w: WorkerRow): string[] {
  return [
    w.id,
    w.device,
    w.state,
    formatCount(w.share),
    formatCount(w.samples),
    `${formatCount(w.compute_s * 1000)} ms`,
    `${formatCount(w.comm_s * 1000)} ms`,
    `${formatCount(w.idle_s * 1000)} ms`,
    (w.bytes_sent / 1e6).toFixed(1),
  ];
}

function WorkerTable({ workers }: { workers: WorkerRow[] }) {
  return (
    <StateTable
      header={COLUMNS}
      rows={workers.map((w) => ({ key: w.id, cells: workerCells(w), color: STATE_COLOR[w.state] }))}
      right={RIGHT}
      stateColumn={2}
    />
  );
}

export function TrainView({ state }: { state: TrainViewState }) {
  const s = state;
  const fraction = s.steps > 0 ? s.step / s.steps : 0;
  const eta = estimateEta(s.wallS, s.step, s.steps);
  const width = String(s.steps || 0).length;
  return (
    <Box flexDirection="column">
      <Text wrap="truncate">
        <Text bold>nimble train</Text>
        {s.name ? <Text bold color="cyan">{` ${s.name}`}</Text> : null}
        {s.runDir ? <Text dimColor>{`  → ${s.runDir}`}</Text> : null}
      </Text>
      <Text wrap="truncate">
        {`${progressBar(fraction, 30)} step ${String(s.step).padStart(width)}/${s.steps}  ${Math.floor(fraction * 100)}%`}
        {`  elapsed ${formatDuration(s.wallS)}`}
        {eta !== undefined && !s.done ? `  ETA ${formatDuration(eta)}` : ""}
      </Text>
      <Text wrap="truncate">
        {`loss ${s.loss !== undefined ? formatMetric(s.loss) : "-"} `}
        <Text color="magenta">{sparkline(s.losses)}</Text>
      </Text>
      <Text wrap="truncate">
        {`lr ${s.lr !== undefined ? formatSci(s.lr) : "-"}  `}
        {`${s.samplesPerS !== undefined ? formatRate(s.samplesPerS) : "-"} samples/s  `}
        {`${formatCount(s.samples)} samples  sent ${formatBytes(s.bytesSent)} (${formatRatio(s.compressionRatio)} compression)`}
      </Text>
      {s.diloco ? <Text wrap="truncate">{formatDiloco(s.diloco)}</Text> : null}
      {s.pipeline ? (
        <Box flexDirection="column">
          {formatPipelineRows(s.pipeline).map((l, i) => (
            <Text key={i} wrap="truncate" color="cyan">
              {l}
            </Text>
          ))}
        </Box>
      ) : null}
      {s.eval ? (
        <Text wrap="truncate" color="blue">
          {`eval @ step ${s.eval.step}: ${formatMetrics(s.eval.metrics)}`}
          {Object.entries(s.evalHistory)
            .filter(([, values]) => values.length > 1)
            .map(([name, values]) => `  ${name} ${sparkline(values, 20)}`)
            .join("")}
        </Text>
      ) : null}
      {s.workers.length > 0 ? <WorkerTable workers={s.workers} /> : null}
      {s.lines.length > 0 ? (
        <Box flexDirection="column" marginTop={1}>
          {s.lines.map((l, i) => (
            <Text key={i} dimColor wrap="truncate">
              {l}
            </Text>
          ))}
        </Box>
      ) : null}
      {s.done ? (
        <Box flexDirection="column" marginTop={1}>
          {s.done.map((l, i) => (
            <Text key={i} color="green">
              {l}
            </Text>
          ))}
        </Box>
      ) : null}
      {s.error ? <Text color="red">{`error: ${s.error}`}</Text> : null}
    </Box>
  );
}

export interface InkReporterOptions {
  /** Terminal to draw on. Default process.stdout. */
  stdout?: NodeJS.WriteStream;
  stderr?: NodeJS.WriteStream;
  stdin?: NodeJS.ReadStream;
  /** Header: the job name and run directory, when known before the first event. */
  name?: string;
  runDir?: string;
  /** Show debug status lines in the rolling log (`--verbose`). */
  verbose?: boolean;
  /** Minimum ms between re-renders. Default 100 (10 per second). */
  throttleMs?: number;
  /** Let ink capture console.* output above the view. Default true. */
  patchConsole?: boolean;
}

export class InkReporter implements Reporter {
  private state: TrainViewState;
  private readonly instance: Instance;
  private readonly render: Throttle;
  private closed = false;

  constructor(options: InkReporterOptions = {}) {
    this.state = initialViewState({ name: options.name, runDir: options.runDir, verbose: options.verbose });
    // Ink spreads these over its defaults: leave out what is not given (an explicit
    // `stdin: undefined` would replace process.stdin and break rendering).
    this.instance = render(<TrainView state={this.state} />, {
      stdout: options.stdout ?? process.stdout,
      stderr: options.stderr ?? process.stderr,
      ...(options.stdin ? { stdin: options.stdin } : {}),
      exitOnCtrlC: false,
      patchConsole: options.patchConsole ?? true,
    });
    this.render = new Throttle(() => this.instance.rerender(<TrainView state={this.state} />), options.throttleMs ?? 100);
    this.render.touch();
  }

  /** The state as of the last event (for tests and for callers that want a final look). */
  get viewState(): TrainViewState {
    return this.state;
  }

  handle(event: TrainEvent): void {
    if (this.closed) return;
    this.state = reduceView(this.state, event);
    if (event.type === "done" || event.type === "error") this.render.flush();
    else this.render.request();
  }

  close(): void {
    if (this.closed) return;
    this.render.flush();
    this.closed = true;
    this.instance.unmount();
  }
}
