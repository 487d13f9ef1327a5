/** What the `nimble provide` view shows, and how each provider event changes it (pure, no React). */
import type { LinkBytes, ProviderEvent, StatsEvent, WorkerState } from "../job/provider/index.js";
import type { DeviceInfo, ProviderLimits, ProviderProfile } from "../protocol/messages.js";
import { appendKeepingLast } from "./state.js";

/** Log lines kept for the view's rolling log. */
export const PROVIDE_LOG_LINES = 8;

export interface ProvideWorkerRow {
  rank: number;
  device: string;
  state: WorkerState;
  restarts: number;
  pid: number | null;
  /** Why it left, for a `left` worker. */
  detail?: string;
  steps: number;
  samples: number;
  computeMs: number | null;
  commMs: number | null;
}

export interface ProvideJob {
  id: string;
  name: string;
  ranks: number[];
  worldSize: number;
  /** When it arrived (ms since the epoch). */
  since: number;
  /** Who started it: the coordinator's key fingerprint and address. */
  from: { fingerprint: string; address: string };
  /** sha256 of its task file (hex). */
  taskSha256: string;
}

/** Bytes per second over the last two stats events, once there are two. */
export interface ByteRates {
  sent: number;
  received: number;
}

export interface ProvideViewState {
  /** Set by `listening`: until then the provider is still resolving Python or measuring itself. */
  url?: string;
  /** Token mode: the token; key mode: null. */
  token?: string | null;
  /** This provider's key fingerprint, and in key mode how many coordinator keys it admits. */
  fingerprint?: string;
  allowed?: number | null;
  /** The owner's limits in force. */
  limits?: ProviderLimits;
  /** When it started listening (ms since the epoch), for the uptime. */
  listeningAt?: number;
  devices: DeviceInfo[];
  profile: ProviderProfile | null;
  job: ProvideJob | null;
  /** The last job that ended, shown while waiting for the next one. */
  lastJob: { id: string; reason: string } | null;
  workers: ProvideWorkerRow[];
  /** The current job's latest figures. */
  stats: StatsEvent | null;
  rates: ByteRates | null;
  /** Jobs that ended: what they added up to, so totals cover this provider's whole life. */
  finished: { jobs: number; steps: number; samples: number; sent: number; received: number };
  /** The last PROVIDE_LOG_LINES log lines, oldest first. */
  lines: string[];
}

export function initialProvideState(): ProvideViewState {
  return {
    devices: [],
    profile: null,
    job: null,
    lastJob: null,
    workers: [],
    stats: null,
    rates: null,
    finished: { jobs: 0, steps: 0, samples: 0, sent: 0, received: 0 },
    lines: [],
  };
}

/** Ring and control link bytes together: everything the job moved through this host's network. */
export function jobBytes(stats: Pick<StatsEvent, "ring" | "control">): LinkBytes {
  return { sent: stats.ring.sent + stats.control.sent, received: stats.ring.received + stats.control.received };
}

/** This provider's totals over every job it ran, the current one included. */
export function provideTotals(s: ProvideViewState): { jobs: number; steps: number; samples: number; sent: number; received: number } {
  const current = s.stats ? { steps: s.stats.steps, samples: s.stats.samples, ...jobBytes(s.stats) } : { steps: 0, samples: 0, sent: 0, received: 0 };
  return {
    jobs: s.finished.jobs + (s.job ? 1 : 0),
    steps: s.finished.steps + current.steps,
    samples: s.finished.samples + current.samples,
    sent: s.finished.sent + current.sent,
    received: s.finished.received + current.received,
  };
}

function pushLine(lines: string[], line: string): string[] {
  return appendKeepingLast(lines, line, PROVIDE_LOG_LINES);
}

function rowFor(rank: number, device: string): ProvideWorkerRow {
  return { rank, device, state: "starting", restarts: 0, pid: null, steps: 0, samples: 0, computeMs: null, commMs: null };
}

/** Replace (or add, in rank order) the row for `rank`. */
function withRow(rows: ProvideWorkerRow[], rank: number, device: string, change: Partial<ProvideWorkerRow>): ProvideWorkerRow[] {
  const existing = rows.find((r) => r.rank === rank);
  const row = { ...(existing ?? rowFor(rank, device)), ...change };
  return [...rows.filter((r) => r.rank !== rank), row].sort((a, b) => a.rank - b.rank);
}

function rates(previous: StatsEvent | null, next: StatsEvent): ByteRates | null {
  if (!previous || previous.job !== next.job) return null;
  const seconds = next.elapsed_s - previous.elapsed_s;
  if (!(seconds > 0)) return null;
  const before = jobBytes(previous);
  const after = jobBytes(next);
  return { sent: (after.sent - before.sent) / seconds, received: (after.received - before.received) / seconds };
}

/** `now` (ms since the epoch) stamps when the provider started listening and when a job arrived. */
export function reduceProvide(s: ProvideViewState, e: ProviderEvent, now: number): ProvideViewState {
  switch (e.type) {
    case "listening":
      return { ...s, url: e.url, token: e.token, fingerprint: e.fingerprint, allowed: e.allow?.length ?? null, limits: e.limits, devices: e.devices, profile: e.profile ?? null, listeningAt: now };
    case "spare":
      return s; // its lines come as log events
    case "log":
      return { ...s, lines: pushLine(s.lines, e.level === "warn" || e.level === "error" ? `${e.level}: ${e.line}` : e.line) };
    case "job":
      return {
        ...s,
        job: { id: e.job, name: e.name, ranks: e.ranks, worldSize: e.world_size, since: now, from: { fingerprint: e.coordinator.fingerprint, address: e.coordinator.address }, taskSha256: e.task_sha256 },
        workers: [],
        stats: null,
        rates: null,
      };
    case "worker":
      if (s.job?.id !== e.job) return s;
      return {
        ...s,
        workers: withRow(s.workers, e.rank, e.device, { device: e.device, state: e.state, restarts: e.restarts, pid: e.pid, detail: e.detail }),
      };
    case "stats": {
      if (s.job?.id !== e.job) return s;
      let workers = s.workers;
      for (const r of e.ranks) {
        workers = withRow(workers, r.rank, r.device, { steps: r.steps, samples: r.samples, computeMs: r.compute_ms, commMs: r.comm_ms });
      }
      return { ...s, stats: e, rates: rates(s.stats, e), workers };
    }
    case "job_end": {
      if (s.job?.id !== e.job) return { ...s, lastJob: { id: e.job, reason: e.reason } };
      const done = s.stats ? { steps: s.stats.steps, samples: s.stats.samples, ...jobBytes(s.stats) } : { steps: 0, samples: 0, sent: 0, received: 0 };
      return {
        ...s,
        job: null,
        lastJob: { id: e.job, reason: e.reason },
        stats: null,
        rates: null,
        finished: {
          jobs: s.finished.jobs + 1,
          steps: s.finished.steps + done.steps,
          samples: s.finished.samples + done.samples,
          sent: s.finished.sent + done.sent,
          received: s.finished.received + done.received,
        },
      };
    }
  }
}
