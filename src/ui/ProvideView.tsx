/** The live terminal view of `nimble provide`, and the reporter that drives it. */
import { Box, render, Text, type Instance } from "ink";
import type { ProviderEvent, WorkerState } from "../job/provider/index.js";
import { formatBytes, formatCount, formatDuration } from "./format.js";
import { formatLimits, formatProfile, type ProvideReporter } from "./providePlain.js";
import { initialProvideState, provideTotals, reduceProvide, type ProvideViewState, type ProvideWorkerRow } from "./provideState.js";
import { StateTable } from "./StateTable.js";
import { Throttle } from "./throttle.js";

const STATE_COLOR: Record<WorkerState, string> = {
  starting: "yellow",
  restarting: "yellow",
  ready: "cyan",
  training: "green",
  left: "magenta",
  stopped: "gray",
};

const COLUMNS = ["rank", "device", "state", "restarts", "pid", "steps", "samples", "compute", "comm"] as const;
const RIGHT = new Set([0, 3, 4, 5, 6, 7, 8]);
const STATE_COLUMN = 2;

function ms(value: number | null): string {
  return value === null ? "-" : `${formatCount(value)} ms`;
}

function workerCells(w: ProvideWorkerRow): string[] {
  return [String(w.rank), w.device, w.state, String(w.restarts), w.pid === null ? "-" : String(w.pid), formatCount(w.steps), formatCount(w.samples), ms(w.computeMs), ms(w.commMs)];
}

function WorkerTable({ workers }: { workers: ProvideWorkerRow[] }) {
  return (
    <StateTable
      header={COLUMNS}
      rows={workers.map((w) => ({
        key: w.rank,
        cells: workerCells(w),
        color: STATE_COLOR[w.state],
        after: w.detail ? <Text dimColor>{`  ${w.detail}`}</Text> : null,
      }))}
      right={RIGHT}
      stateColumn={STATE_COLUMN}
    />
  );
}

function rate(bytesPerS: number | undefined): string {
  return bytesPerS === undefined ? "" : ` (${formatBytes(bytesPerS)}/s)`;
}

/** `now` (ms since the epoch) drives the uptime and how long the job has run. */
export function ProvideView({ state, now }: { state: ProvideViewState; now: number }) {
  const s = state;
  const totals = provideTotals(s);
  const label = (text: string) => <Text bold>{text.padEnd(9)}</Text>;
  return (
    <Box flexDirection="column">
      <Text wrap="truncate">
        <Text bold>nimble provide</Text>
        {s.url ? (
          <>
            {"  "}
            <Text bold color="cyan">
              {s.url}
            </Text>
            {s.token ? `  token ${s.token}` : `  admits ${s.allowed ?? 0} key${s.allowed === 1 ? "" : "s"}`}
            {s.fingerprint ? <Text dimColor>{`  key ${s.fingerprint}`}</Text> : null}
            {s.listeningAt !== undefined ? <Text dimColor>{`  up ${formatDuration((now - s.listeningAt) / 1000)}`}</Text> : null}
          </>
        ) : (
          <Text dimColor>{"  starting…"}</Text>
        )}
      </Text>
      {s.devices.map((d) => (
        <Text key={d.id} wrap="truncate">
          {label("device")}
          {`${d.id} (${d.name})`}
          {d.memory_bytes ? <Text dimColor>{`  ${formatBytes(d.memory_bytes)}`}</Text> : null}
        </Text>
      ))}
      {s.limits ? (
        <Text wrap="truncate">
          {label("limits")}
          {s.limits.sandbox === "bwrap" ? formatLimits(s.limits) : <Text color="red">{formatLimits(s.limits)}</Text>}
        </Text>
      ) : null}
      {s.url ? (
        <Text wrap="truncate">
          {label("profile")}
          {s.profile ? formatProfile(s.profile) : <Text dimColor>not measured (--no-profile)</Text>}
        </Text>
      ) : null}
      <Text wrap="truncate">
        {label("job")}
        {s.job ? (
          <>
            <Text bold color="cyan">
              {s.job.name || s.job.id}
            </Text>
            {s.job.name ? <Text dimColor>{` ${s.job.id}`}</Text> : null}
            {`  rank${s.job.ranks.length === 1 ? "" : "s"} ${s.job.ranks.join(", ")} of ${s.job.worldSize}`}
            {`  for ${formatDuration((now - s.job.since) / 1000)}`}
            {s.stats && s.stats.step > 0 ? `  at step ${formatCount(s.stats.step)}` : ""}
          </>
        ) : (
          <Text dimColor>
            {"waiting for a job"}
            {s.lastJob ? ` (last: ${s.lastJob.id} ended: ${s.lastJob.reason})` : ""}
          </Text>
        )}
      </Text>
      {s.job ? (
        <Text wrap="truncate">
          {label("from")}
          {`coordinator ${s.job.from.fingerprint} at ${s.job.from.address}`}
          <Text dimColor>{`  task sha256 ${s.job.taskSha256.slice(0, 16)}`}</Text>
        </Text>
      ) : null}
      {s.job && s.workers.length > 0 ? <WorkerTable workers={s.workers} /> : null}
      <Box flexDirection="column" marginTop={1}>
        <Text wrap="truncate">
          {label("totals")}
          {`${formatCount(totals.samples)} samples contributed over ${formatCount(totals.steps)} steps`}
          {totals.jobs > 0 ? <Text dimColor>{`  (${totals.jobs} job${totals.jobs === 1 ? "" : "s"})`}</Text> : null}
        </Text>
        <Text wrap="truncate">
          {label("network")}
          <Text color="green">{`↑ sent ${formatBytes(totals.sent)}${rate(s.rates?.sent)}`}</Text>
          {"  "}
          <Text color="blue">{`↓ received ${formatBytes(totals.received)}${rate(s.rates?.received)}`}</Text>
        </Text>
        {s.stats ? (
          <Text dimColor wrap="truncate">
            {" ".repeat(9)}
            {`this job: ring ↑ ${formatBytes(s.stats.ring.sent)} ↓ ${formatBytes(s.stats.ring.received)}, control ↑ ${formatBytes(s.stats.control.sent)} ↓ ${formatBytes(s.stats.control.received)}`}
          </Text>
        ) : null}
      </Box>
      {s.lines.length > 0 ? (
        <Box flexDirection="column" marginTop={1}>
          {s.lines.map((l, i) => (
            <Text key={i} dimColor={!/^(warn|error): /.test(l)} color={l.startsWith("error: ") ? "red" : l.startsWith("warn: ") ? "yellow" : undefined} wrap="truncate">
              {l}
            </Text>
          ))}
        </Box>
      ) : null}
    </Box>
  );
}

export interface InkProvideReporterOptions {
  /** Terminal to draw on. Default process.stdout. */
  stdout?: NodeJS.WriteStream;
  stderr?: NodeJS.WriteStream;
  stdin?: NodeJS.ReadStream;
  /** Show debug log lines in the rolling log (`--verbose`). */
  verbose?: boolean;
  /** Minimum ms between re-renders. Default 100. */
  throttleMs?: number;
  /** Let ink capture console.* output above the view. Default true. */
  patchConsole?: boolean;
}

/** Re-renders at most every `throttleMs`, and once a second for the clocks. */
export class InkProvideReporter implements ProvideReporter {
  private state: ProvideViewState = initialProvideState();
  private readonly instance: Instance;
  private readonly render: Throttle;
  private readonly clock: NodeJS.Timeout;
  private readonly verbose: boolean;
  private closed = false;

  constructor(options: InkProvideReporterOptions = {}) {
    this.verbose = options.verbose ?? false;
    // Ink spreads these over its defaults: leave out what is not given (an explicit
    // `stdin: undefined` would replace process.stdin). Ctrl-C stays with the command.
    this.instance = render(<ProvideView state={this.state} now={Date.now()} />, {
      stdout: options.stdout ?? process.stdout,
      stderr: options.stderr ?? process.stderr,
      ...(options.stdin ? { stdin: options.stdin } : {}),
      exitOnCtrlC: false,
      patchConsole: options.patchConsole ?? true,
    });
    this.render = new Throttle(() => this.instance.rerender(<ProvideView state={this.state} now={Date.now()} />), options.throttleMs ?? 100);
    this.render.touch();
    this.clock = setInterval(() => this.render.request(), 1000);
    this.clock.unref();
  }

  /** The state as of the last event (for tests). */
  get viewState(): ProvideViewState {
    return this.state;
  }

  handle(event: ProviderEvent): void {
    if (this.closed) return;
    if (event.type === "log" && event.level === "debug" && !this.verbose) return;
    this.state = reduceProvide(this.state, event, Date.now());
    this.render.request();
  }

  close(): void {
    if (this.closed) return;
    clearInterval(this.clock);
    this.render.flush();
    this.closed = true;
    this.instance.unmount();
  }
}
