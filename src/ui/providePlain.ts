/**
 * `nimble provide` for non-terminals (CI, pipes, service logs): one human line per
 * noteworthy event, and a stats line at most every `statsIntervalMs` while a job runs.
 */
import type { ProviderEvent, StatsEvent, WorkerEvent } from "../job/provider/index.js";
import type { ProviderLimits, ProviderProfile } from "../protocol/messages.js";
import { formatBytes, formatCount, formatRate } from "./format.js";
import { jobBytes } from "./provideState.js";
import type { TextSink, Verbosity } from "./plain.js";

export interface ProvideReporter {
  handle(event: ProviderEvent): void;
  close(): void;
}

export interface ProvidePlainOptions {
  out?: TextSink;
  /** quiet: the listening block, jobs starting and ending, warnings and errors. verbose: also every stats event and debug lines. */
  verbosity?: Verbosity;
  /** Milliseconds clock, injectable for tests. Default Date.now. */
  now?: () => number;
  /** Least time between two stats lines (normal verbosity). Default 10 s. */
  statsIntervalMs?: number;
}

/** `1,234 GFLOP/s fp32, 45.6 GB/s memory (cpu, measured 2025-06-01)`. */
export function formatProfile(p: ProviderProfile): string {
  const figures = [
    p.matmul_gflops_fp32 !== null ? `${formatCount(p.matmul_gflops_fp32)} GFLOP/s fp32` : null,
    p.memory_gbps !== null ? `${formatRate(p.memory_gbps)} GB/s memory` : null,
  ].filter((f) => f !== null);
  return `${figures.length > 0 ? figures.join(", ") : "no figures"} (${p.device}, measured ${p.measured_at.slice(0, 10)})`;
}

/** `confined (bwrap); per worker 8.0 GB, 512 processes, files up to 17.2 GB; jobs up to 12 h`. */
export function formatLimits(l: ProviderLimits): string {
  const how = l.sandbox === "bwrap" ? "confined (bwrap)" : l.sandbox === "none" ? "UNCONFINED (--no-sandbox)" : "cannot confine: refuses jobs";
  const memory = l.max_memory_bytes !== null ? `${formatBytes(l.max_memory_bytes)}, ` : "";
  const hours = l.max_job_hours !== null ? `; jobs up to ${l.max_job_hours} h` : "";
  const installs = l.job_requirements === false ? "; no per-job requirements" : "";
  return `${how}; per worker ${memory}${formatCount(l.max_processes)} processes, files up to ${formatBytes(l.max_file_bytes)}${hours}${installs}`;
}

export function formatListening(e: Extract<ProviderEvent, { type: "listening" }>): string[] {
  return [
    `nimble provider listening on ${e.url}`,
    `  key:     ${e.key} (${e.fingerprint})`,
    ...(e.token !== null ? [`  token:   ${e.token}`] : [`  admits:  ${(e.allow ?? []).map((k) => k).join(", ")}`]),
    ...e.devices.map((d) => `  device:  ${d.id} (${d.name})`),
    `  limits:  ${formatLimits(e.limits)}`,
    ...(e.profile ? [`  profile: ${formatProfile(e.profile)}`] : []),
    e.token !== null
      ? `Give the address and token to the researcher (config \`providers:\`, with \`key:\` to check this host too). Ctrl-C stops.`
      : `Give the address and key to the researcher (config \`providers:\` with \`key:\`). Ctrl-C stops.`,
  ];
}

/** `job X: step 120, 3,840 samples, sent 12.4 MB, received 12.1 MB`. */
export function formatStatsLine(e: StatsEvent): string {
  const bytes = jobBytes(e);
  return `job ${e.job}: step ${e.step}, ${formatCount(e.samples)} samples, sent ${formatBytes(bytes.sent)}, received ${formatBytes(bytes.received)}`;
}

export function formatWorkerLine(e: WorkerEvent): string {
  const restarts = e.restarts > 0 ? ` (restart ${e.restarts})` : "";
  const detail = e.detail ? `: ${e.detail}` : "";
  return `rank ${e.rank} (${e.device}): ${e.state}${restarts}${detail}`;
}

export class ProvidePlainReporter implements ProvideReporter {
  private readonly out: TextSink;
  private readonly verbosity: Verbosity;
  private readonly now: () => number;
  private readonly statsIntervalMs: number;
  /** When the running job started or its last stats line went out. */
  private lastStatsAt = 0;
  /** The running job's latest stats, for the job's closing line. */
  private latest: StatsEvent | null = null;
  private closed = false;

  constructor(options: ProvidePlainOptions = {}) {
    this.out = options.out ?? process.stdout;
    this.verbosity = options.verbosity ?? "normal";
    this.now = options.now ?? Date.now;
    this.statsIntervalMs = options.statsIntervalMs ?? 10_000;
  }

  handle(e: ProviderEvent): void {
    if (this.closed) return;
    const quiet = this.verbosity === "quiet";
    const verbose = this.verbosity === "verbose";
    switch (e.type) {
      case "listening":
        for (const l of formatListening(e)) this.line(l);
        return;
      case "job":
        this.latest = null;
        this.lastStatsAt = this.now();
        this.line(`job ${e.job} (${e.name}): ranks ${e.ranks.join(", ")} of ${e.world_size}, from ${e.coordinator.fingerprint} at ${e.coordinator.address}, task sha256 ${e.task_sha256.slice(0, 16)}`);
        return;
      case "worker":
        if (!quiet) this.line(formatWorkerLine(e));
        return;
      case "stats":
        this.latest = e;
        if (quiet) return;
        if (verbose || this.now() - this.lastStatsAt >= this.statsIntervalMs) {
          this.lastStatsAt = this.now();
          this.line(formatStatsLine(e));
        }
        return;
      case "spare":
        return; // its lines come as log events
      case "log":
        if (e.level === "warn" || e.level === "error") this.line(`${e.level}: ${e.line}`);
        else if (e.level === "info" ? !quiet : verbose) this.line(e.line);
        return;
      case "job_end": {
        const s = this.latest?.job === e.job ? this.latest : null;
        const totals = s ? ` (${s.steps} steps, ${formatCount(s.samples)} samples, sent ${formatBytes(jobBytes(s).sent)}, received ${formatBytes(jobBytes(s).received)})` : "";
        this.line(`job ${e.job} ended: ${e.reason}${totals}`);
        this.latest = null;
        return;
      }
    }
  }

  close(): void {
    this.closed = true;
  }

  private line(s: string): void {
    this.out.write(s + "\n");
  }
}

/** `--json`: every event, as one JSON object per line. */
export class ProvideJsonReporter implements ProvideReporter {
  private closed = false;
  constructor(private readonly out: TextSink = process.stdout) {}

  handle(e: ProviderEvent): void {
    if (!this.closed) this.out.write(JSON.stringify(e) + "\n");
  }

  close(): void {
    this.closed = true;
  }
}
