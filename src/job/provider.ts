import { randomBytes, timingSafeEqual } from "node:crypto";
import { createServer, type IncomingMessage, type Server } from "node:http";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type { Duplex } from "node:stream";
import { WebSocketServer, type WebSocket } from "ws";
import { expectedFrameBytesPerNode, RingAllReduce, type WireCodec } from "../collective/ring.js";
import { errorMessage, UserError } from "../errors.js";
import { acceptRingPeer, afterLatency, connectRingPeer, FrameLink, type LinkOptions, secretsEqual } from "../net/link.js";
import { BENCH_FRAME_BYTES, measurePeer, servePeerBench } from "../net/peerBench.js";
import { watchHeartbeat } from "../net/heartbeat.js";
import { RateLimit } from "../net/rateLimit.js";
import { MAX_FRAME_BYTES } from "../protocol/frames.js";
import {
  decodeToProvider,
  encodeMessage,
  MAX_CONTROL_BYTES,
  PROTOCOL_VERSION,
  type Decision,
  type DeviceInfo,
  type LogLevel,
  type ProviderProfile,
  type ToCoordinator,
  type ToProvider,
} from "../protocol/messages.js";
import type { PythonEnv } from "../runtime/python.js";
import { WorkerProcess } from "../runtime/worker.js";
import { parseFromWorker, type FromWorker } from "../protocol/workerOps.js";

/**
 * What one local worker is doing. starting/restarting: its process loads the task and model
 * (restarting: after a crash); ready: loaded, waiting for the ring or its first step;
 * training: it has been given a step; left: out of the job (left out of the ring, or it kept
 * crashing); stopped: the job ended.
 */
export type WorkerState = "starting" | "restarting" | "ready" | "training" | "left" | "stopped";

/** Bytes this host sent and received on some links, counted where the frames are handed over. */
export interface LinkBytes {
  sent: number;
  received: number;
}

/** One local rank's part in the job so far. */
export interface RankStats {
  rank: number;
  device: string;
  /** Steps it computed and that were not abandoned (a step redone after a fault counts once). */
  steps: number;
  /** The sum of its shares over those steps: what the coordinator counts for it. */
  samples: number;
  /** Its last step's compute and all-reduce wait, when it has run one. */
  compute_ms: number | null;
  comm_ms: number | null;
}

export type { LogLevel };

export type ProviderEvent =
  | {
      type: "listening";
      url: string;
      host: string;
      port: number;
      token: string;
      devices: DeviceInfo[];
      /** This host's measured profile, as advertised to coordinators (null with --no-profile). */
      profile: ProviderProfile | null;
    }
  | { type: "log"; line: string; level: LogLevel }
  | { type: "job"; job: string; name: string; ranks: number[]; world_size: number }
  | { type: "worker"; job: string; rank: number; device: string; state: WorkerState; restarts: number; pid: number | null; detail?: string }
  | {
      type: "stats";
      job: string;
      name: string;
      /** Seconds since the job arrived here. */
      elapsed_s: number;
      /** The job's last step this host reported, counted from 1 as `nimble train` shows it (0: none yet). */
      step: number;
      /** Steps at least one local rank took part in. */
      steps: number;
      /** Samples contributed by the local ranks: the sum of their shares over their steps. */
      samples: number;
      ranks: RankStats[];
      /** Ring links of the job (gradient and state frames, hellos included). */
      ring: LinkBytes;
      /** The coordinator's control connection that carries the job (task file and checkpoints included). */
      control: LinkBytes;
    }
  | { type: "job_end"; job: string; reason: string };

export type StatsEvent = Extract<ProviderEvent, { type: "stats" }>;
export type WorkerEvent = Extract<ProviderEvent, { type: "worker" }>;

export interface ProviderOptions {
  host: string;
  port: number;
  token?: string;
  python: PythonEnv;
  devices: DeviceInfo[];
  /** torch intra-op threads per worker; default: this host's cores divided among its workers. */
  threads?: number;
  /**
   * Testing and benchmarking aid: run workers at this fraction of their speed (0 < s <= 1).
   * With `speedFile`, the file's number is re-read every half second and applied mid-run.
   */
  speed?: number;
  speedFile?: string;
  /** Largest micro-batch a worker runs at once; a larger share accumulates over several. */
  maxMicroBatch?: number;
  /** This host's measured profile, advertised to coordinators. */
  profile?: ProviderProfile;
  /**
   * Testing and benchmarking aid: pace everything this host uploads (ring frames, bench
   * uploads) to this many bytes/s, to reproduce a slow internet link over loopback.
   */
  linkRate?: number;
  /**
   * Testing and benchmarking aid: a one-way latency (ms) on this host's links. Ring frames
   * and coordinator messages are handed on this long after they arrive, and messages to the
   * coordinator leave this long after they are sent, so every round trip gains 2x.
   */
  latencyMs?: number;
  onEvent: (event: ProviderEvent) => void;
}

type JobSpec = Extract<ToProvider, { t: "job" }>;

/** Close code for a ring connection whose job never arrived here. */
const CLOSE_NO_SUCH_JOB = 4005;
/** How long a ring neighbour may take to connect once a job starts. */
const RING_CONNECT_TIMEOUT_MS = 60_000;
/** Close code for a ring link dropped because the ring re-forms: not a fault. */
const CLOSE_REFORM = 4006;
/** `stats` events go out at most this often while a job runs, and only when a figure changed. */
export const STATS_INTERVAL_MS = 500;

/**
 * `nimble provide`: a long-running agent. One WebSocket server carries the control plane
 * (`/control`, one coordinator at a time, token required) and the data plane (`/ring`,
 * neighbours in the current job's ring, job secret required).
 */
export class Provider {
  readonly token: string;
  private server: Server | null = null;
  private readonly controlServer = new WebSocketServer({ noServer: true, maxPayload: MAX_CONTROL_BYTES });
  private readonly ringServer = new WebSocketServer({ noServer: true, maxPayload: MAX_FRAME_BYTES });
  private readonly benchServer = new WebSocketServer({ noServer: true, maxPayload: BENCH_FRAME_BYTES, perMessageDeflate: false });
  private job: ProviderJob | null = null;
  /** Ring connections that arrived before their job: held until it does, or time out. */
  private pendingRing: FrameLink[] = [];
  private readonly uplink: RateLimit | null;
  /** Per control connection: the job that ended on it, so late messages for it are not failures. */
  private readonly endedOn = new WeakMap<WebSocket, { job: string; reason: string }>();

  constructor(private readonly opts: ProviderOptions) {
    this.token = opts.token ?? randomBytes(16).toString("hex");
    this.uplink = opts.linkRate ? new RateLimit(opts.linkRate) : null;
  }

  /** Upload pacing for every link of this host (the --link-rate testing aid), if any. */
  private get throttle(): ((bytes: number) => Promise<void>) | undefined {
    const uplink = this.uplink;
    return uplink ? (bytes) => uplink.take(bytes) : undefined;
  }

  /** The testing aids' pacing and latency, for every ring link of this host. */
  private get linkOptions(): LinkOptions {
    return { throttle: this.throttle, latencyMs: this.opts.latencyMs };
  }

  async start(): Promise<{ url: string; port: number }> {
    const server = createServer((_req, res) => {
      res.writeHead(426, { "content-type": "text/plain" });
      res.end("nimble provider: connect with a WebSocket to /control\n");
    });
    server.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      const pathname = new URL(req.url ?? "/", "http://x").pathname;
      if (pathname === "/bench") {
        // The provider's token, or the secret of the job it runs (ring members measuring their links).
        const accepts = (given: string) => tokensEqual(given, this.token) || (this.job !== null && secretsEqual(given, this.job.spec.secret));
        this.benchServer.handleUpgrade(req, socket, head, (ws) => servePeerBench(ws, accepts));
        return;
      }
      const target = pathname === "/control" ? this.controlServer : pathname === "/ring" ? this.ringServer : null;
      if (!target) {
        socket.end("HTTP/1.1 404 Not Found\r\n\r\n");
        return;
      }
      target.handleUpgrade(req, socket, head, (ws) => (target === this.controlServer ? this.onControl(ws, req) : this.onRing(ws)));
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", (err: NodeJS.ErrnoException) => {
        const where = `${this.opts.host}:${this.opts.port}`;
        if (err.code === "EADDRINUSE") reject(new UserError(`Port ${where} is already in use`, "Pass another --port, or --port 0 to pick a free one."));
        else if (err.code === "EACCES") reject(new UserError(`Not allowed to listen on ${where}`, "Ports below 1024 need privileges: pass a --port above 1024."));
        else if (err.code === "EADDRNOTAVAIL") reject(new UserError(`${this.opts.host} is not an address of this host`, "Use --host 0.0.0.0 to listen on every interface."));
        else reject(err);
      });
      server.listen(this.opts.port, this.opts.host, () => resolve());
    });
    this.server = server;
    const address = server.address();
    const port = typeof address === "object" && address ? address.port : this.opts.port;
    const hostForUrl = this.opts.host.includes(":") ? `[${this.opts.host}]` : this.opts.host;
    const url = `ws://${hostForUrl}:${port}`;
    this.opts.onEvent({ type: "listening", url, host: this.opts.host, port, token: this.token, devices: this.opts.devices, profile: this.opts.profile ?? null });
    return { url, port };
  }

  async close(): Promise<void> {
    await this.job?.end("provider shutting down");
    for (const link of this.pendingRing) link.terminate();
    for (const ws of this.controlServer.clients) ws.terminate();
    for (const ws of this.ringServer.clients) ws.terminate();
    for (const ws of this.benchServer.clients) ws.terminate();
    this.benchServer.close();
    this.controlServer.close();
    this.ringServer.close();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  private log(line: string, level: LogLevel = "info") {
    this.opts.onEvent({ type: "log", line, level });
  }

  private onControl(ws: WebSocket, req: IncomingMessage) {
    const from = `coordinator ${req.socket.remoteAddress}:${req.socket.remotePort}`;
    let authenticated = false;
    /** This connection's traffic; a job it carries reports it as its control bytes. */
    const bytes: LinkBytes = { sent: 0, received: 0 };
    const send = (m: ToCoordinator) => {
      const encoded = encodeMessage(m);
      afterLatency(this.opts.latencyMs, () => {
        if (ws.readyState !== ws.OPEN) return;
        bytes.sent += encoded.byteLength;
        ws.send(encoded);
      });
    };
    const helloTimer = setTimeout(() => ws.close(4003, "no hello"), 10_000);
    this.log(`${from} connected`, "debug");
    ws.on("message", (data, isBinary) => afterLatency(this.opts.latencyMs, () => {
      bytes.received += rawDataLength(data);
      let message: ToProvider;
      try {
        message = decodeToProvider(isBinary ? data : String(data), from);
      } catch (err) {
        this.log(`dropping ${from}: ${errorMessage(err)}`, "warn");
        ws.close(4000, "invalid message");
        return;
      }
      if (!authenticated) {
        clearTimeout(helloTimer);
        if (message.t !== "hello") {
          ws.close(4000, "expected hello");
          return;
        }
        if (message.version !== PROTOCOL_VERSION) {
          const reason = `protocol mismatch: the coordinator speaks protocol ${message.version}, this provider speaks ${PROTOCOL_VERSION} (run the same nimble version on both sides)`;
          this.log(`rejected ${from}: ${reason}`, "warn");
          send({ t: "reject", reason });
          ws.close(4002, "protocol mismatch");
          return;
        }
        if (!tokensEqual(message.token, this.token)) {
          this.log(`rejected ${from}: wrong token`, "warn");
          send({ t: "reject", reason: "wrong token" });
          ws.close(4001, "wrong token");
          return;
        }
        authenticated = true;
        void this.welcome(ws, send);
        return;
      }
      if (message.t === "job") {
        if (this.job) {
          send({ t: "failed", message: `already running job ${this.job.spec.job}`, kind: "internal" });
          return;
        }
        this.startJob(message, send, ws, bytes);
        return;
      }
      const ended = this.endedOn.get(ws) ?? null;
      if (!this.job) {
        // A job this provider left (its workers kept crashing) may still get the job's
        // messages for a moment: they are moot, not a failure.
        if (ended !== null && message.t !== "hello") send({ t: "log", line: `left job ${ended.job} (${ended.reason}); ignoring ${message.t}` });
        else if (message.t !== "cancel") send({ t: "failed", message: `no job is running; got ${message.t}`, kind: "internal" });
        return;
      }
      if (message.t === "cancel") {
        void this.job.end(`cancelled by coordinator: ${message.reason}`);
        return;
      }
      if (message.t !== "hello") this.job.handle(message);
    }));
    ws.on("close", () => afterLatency(this.opts.latencyMs, () => {
      clearTimeout(helloTimer);
      this.log(`${from} disconnected`, "debug");
      if (this.job && this.job.control === ws) void this.job.end("coordinator disconnected");
    }));
    ws.on("error", () => {});
  }

  /**
   * Welcome an authenticated coordinator, or refuse it while another job runs. A job that is
   * only winding down (workers stopping after a cancel) is waited for, so a coordinator that
   * reconnects right after its previous job is not turned away.
   */
  private async welcome(ws: WebSocket, send: (m: ToCoordinator) => void) {
    if (this.job?.ending) await Promise.race([this.job.ending, new Promise((r) => setTimeout(r, 10_000))]);
    if (this.job) {
      send({ t: "reject", reason: `busy with job ${this.job.spec.job}` });
      ws.close(4009, "busy");
      return;
    }
    send({
      t: "welcome",
      version: PROTOCOL_VERSION,
      provider: {
        id: `${os.hostname()}:${this.opts.port}`,
        hostname: os.hostname(),
        python: this.opts.python.pythonVersion,
        torch: this.opts.python.torchVersion,
        devices: this.opts.devices,
        ...(this.opts.profile ? { profile: this.opts.profile } : {}),
      },
    });
  }

  private startJob(spec: JobSpec, send: (m: ToCoordinator) => void, ws: WebSocket, controlBytes: LinkBytes) {
    const job = new ProviderJob(spec, this.opts, send, ws, controlBytes, (line, level) => this.log(line, level), this.linkOptions);
    this.job = job;
    this.opts.onEvent({ type: "job", job: spec.job, name: String(spec.config.name ?? ""), ranks: spec.ranks.map((r) => r.rank), world_size: spec.world_size });
    job.onEnd = (reason) => {
      if (this.job === job) this.job = null;
      this.endedOn.set(ws, { job: spec.job, reason });
      this.opts.onEvent({ type: "job_end", job: spec.job, reason });
    };
    void job.start().catch((err) => {
      send({ t: "failed", message: errorMessage(err), kind: "internal" });
      void job.end(errorMessage(err));
    });
    const pending = this.pendingRing;
    this.pendingRing = [];
    for (const ringWs of pending) job.acceptRing(ringWs);
  }

  private onRing(ws: WebSocket) {
    // Wrap at once: a FrameLink keeps frames (the hello) that arrive before anyone listens.
    const link = new FrameLink(ws, this.linkOptions);
    if (this.job) {
      this.job.acceptRing(link);
      return;
    }
    this.pendingRing.push(link);
    const timer = setTimeout(() => {
      this.pendingRing = this.pendingRing.filter((l) => l !== link);
      link.close(CLOSE_NO_SUCH_JOB, "no such job");
    }, RING_CONNECT_TIMEOUT_MS);
    link.onClose(() => {
      clearTimeout(timer);
      this.pendingRing = this.pendingRing.filter((l) => l !== link);
    });
  }
}

function describeClose(code: number, reason: string): string {
  return `code ${code}${reason ? ` (${reason})` : ""}`;
}

/** Bytes of one WebSocket message as ws hands it over. */
function rawDataLength(data: Buffer | ArrayBuffer | Buffer[]): number {
  return Array.isArray(data) ? data.reduce((n, b) => n + b.byteLength, 0) : data.byteLength;
}

function tokensEqual(given: string, expected: string): boolean {
  const a = Buffer.from(given);
  const b = Buffer.from(expected);
  return a.length === b.length && timingSafeEqual(a, b);
}

interface LocalRank {
  rank: number;
  device: string;
  worker: WorkerProcess | null;
  /** Sent "ready" (the worker loaded and its first ring formed). */
  ready: boolean;
  /** The ring epoch its links and `ring` belong to (-1: none formed yet). */
  formed: number;
  /** Left out of the ring by the coordinator, or its worker died: no longer in the job. */
  left: boolean;
  /** The step attempt its worker runs now; collectives of other attempts are dropped. */
  attempt: number;
  /** The ring epoch whose loss this rank already reported. */
  lostEpoch: number;
  /** Times its worker was started again after dying. */
  restarts: number;
  /** Its worker is starting again: it rejoins (as a joiner) once ready. */
  restarting: boolean;
  next: FrameLink | null;
  prev: FrameLink | null;
  ring: RingAllReduce | null;
  /** Ring bytes sent since the last step report. */
  bytesSinceReport: number;
  /** all-reduce requests, served one at a time in order. */
  queue: Promise<void>;
  readyInfo: Extract<FromWorker, { op: "ready" }> | null;
  /** What the view shows of it; a `worker` event goes out when this, restarts or the pid change. */
  state: WorkerState;
  /** Why it left, for a `left` state. */
  leftBecause?: string;
  /** The state, restarts and pid last reported in a `worker` event. */
  reported: string;
  stats: RankStats;
  /** Its last reported step until that step is taken up or abandoned (an abort names it). */
  unsettled: { step: number; samples: number } | null;
}

/** One job on this provider: its workers, their ring links, and the messages between them. */
class ProviderJob {
  private dir = "";
  private readonly ranks: LocalRank[];
  private ended = false;
  /** Ring order of the ranks taking part now; the ring re-forms (a new epoch) when it changes. */
  private members: number[];
  private epoch = 0;
  /** Incoming ring links for an epoch this provider has not been told of yet. */
  private early: { from: number; to: number; epoch: number; link: FrameLink }[] = [];
  /** A ring neighbour or the coordinator silent this long is lost (config faults.heartbeat_s). */
  private readonly heartbeatMs: number;
  private readonly stopControlHeartbeat: () => void;
  /** Data-plane URL of every rank the job has had (joiners' arrive with `ring`). */
  private readonly ringUrls: Map<number, string>;
  private readonly maxRestarts: number;
  onEnd: (reason: string) => void = () => {};
  private readonly startedAt = Date.now();
  /** Ring links of this job that are open; closed ones are folded into `closedRingBytes`. */
  private readonly ringLinks = new Set<FrameLink>();
  private readonly closedRingBytes: LinkBytes = { sent: 0, received: 0 };
  /** The job's last step a local rank reported, and how many steps local ranks took part in. */
  private lastStep = -1;
  private stepsTakenPart = 0;
  private readonly statsTimer: NodeJS.Timeout;
  /** The figures of the last `stats` event, to send one only when something changed. */
  private lastStats = "";

  /**
   * This job's lines (its workers' output, restarts, ring links): on this host's view and in
   * the coordinator's run log. What the coordinator learns from a message of its own
   * (failed, ring_lost) goes to hostLog only, so it is not shown twice.
   */
  private log(line: string, level: LogLevel = "info") {
    this.hostLog(line, level);
    this.send({ t: "log", line, level });
  }

  constructor(
    readonly spec: JobSpec,
    private readonly opts: ProviderOptions,
    private readonly send: (m: ToCoordinator) => void,
    readonly control: WebSocket,
    private readonly controlBytes: LinkBytes,
    private readonly hostLog: (line: string, level?: LogLevel) => void,
    private readonly linkOptions: LinkOptions = {},
  ) {
    // Joining a running job: no ring until the coordinator's `ring` brings this provider in.
    this.members = spec.join ? [] : [...Array(spec.world_size).keys()];
    this.ringUrls = new Map(spec.ring.map((r) => [r.rank, r.url]));
    const maxRestarts = Number((spec.config.faults as { max_restarts?: unknown } | undefined)?.max_restarts);
    this.maxRestarts = Number.isInteger(maxRestarts) && maxRestarts >= 0 ? maxRestarts : 3;
    const faults = spec.config.faults as { heartbeat_s?: unknown } | undefined;
    const heartbeat = Number(faults?.heartbeat_s);
    this.heartbeatMs = heartbeat >= 0.5 && heartbeat <= 3600 ? heartbeat * 1000 : 10_000;
    this.stopControlHeartbeat = watchHeartbeat(control, {
      timeoutMs: this.heartbeatMs,
      onDead: (silent) => void this.end(`the coordinator was silent for ${(silent / 1000).toFixed(1)} s`),
    });
    this.ranks = spec.ranks.map((r) => ({
      rank: r.rank,
      device: r.device,
      worker: null,
      ready: false,
      formed: -1,
      left: false,
      attempt: 0,
      lostEpoch: -1,
      restarts: 0,
      restarting: false,
      next: null,
      prev: null,
      ring: null,
      bytesSinceReport: 0,
      queue: Promise.resolve(),
      readyInfo: null,
      state: "starting",
      reported: "",
      stats: { rank: r.rank, device: r.device, steps: 0, samples: 0, compute_ms: null, comm_ms: null },
      unsettled: null,
    }));
    // Coalesced: --json output and the views get at most two a second, however fast steps are.
    this.statsTimer = setInterval(() => this.emitStats(), STATS_INTERVAL_MS);
    this.statsTimer.unref();
  }

  /** Every ring link of the job counts its bytes (FrameLink counts whole frames). */
  private trackRingLink(link: FrameLink) {
    if (this.ringLinks.has(link)) return;
    this.ringLinks.add(link);
    link.onClose(() => {
      if (!this.ringLinks.delete(link)) return;
      this.closedRingBytes.sent += link.bytesSent;
      this.closedRingBytes.received += link.bytesReceived;
    });
  }

  private ringBytes(): LinkBytes {
    const total = { ...this.closedRingBytes };
    for (const link of this.ringLinks) {
      total.sent += link.bytesSent;
      total.received += link.bytesReceived;
    }
    return total;
  }

  private statsEvent(): StatsEvent {
    const ranks = this.ranks.map((r) => ({ ...r.stats }));
    return {
      type: "stats",
      job: this.spec.job,
      name: String(this.spec.config.name ?? ""),
      elapsed_s: (Date.now() - this.startedAt) / 1000,
      step: this.lastStep + 1,
      steps: this.stepsTakenPart,
      samples: ranks.reduce((n, r) => n + r.samples, 0),
      ranks,
      ring: this.ringBytes(),
      control: { ...this.controlBytes },
    };
  }

  /** A `stats` event, unless no figure changed since the last one (elapsed time aside). */
  private emitStats() {
    const event = this.statsEvent();
    const { elapsed_s: _elapsed, ...figures } = event;
    const key = JSON.stringify(figures);
    if (key === this.lastStats) return;
    this.lastStats = key;
    this.opts.onEvent(event);
  }

  /** Record a rank's state; tell the view when it, the restarts or the worker process changed. */
  private setState(local: LocalRank, state: WorkerState, detail?: string) {
    local.state = state;
    if (state === "left") local.leftBecause = detail;
    const pid = local.worker?.pid ?? null;
    const key = `${state} ${local.restarts} ${pid}`;
    if (key === local.reported) return;
    local.reported = key;
    this.opts.onEvent({
      type: "worker",
      job: this.spec.job,
      rank: local.rank,
      device: local.device,
      state,
      restarts: local.restarts,
      pid,
      ...(state === "left" && local.leftBecause ? { detail: local.leftBecause } : {}),
    });
  }

  /** A rank's step report: its share counts until an abort of that step takes it back. */
  private countStep(local: LocalRank, step: number, samples: number, computeS: number, commS: number) {
    local.stats.steps += 1;
    local.stats.samples += samples;
    local.stats.compute_ms = computeS * 1000;
    local.stats.comm_ms = commS * 1000;
    local.unsettled = { step, samples };
    if (step !== this.lastStep) this.stepsTakenPart += 1;
    this.lastStep = step;
  }

  /** The coordinator abandoned `step`: shares reported for it were not counted there either. */
  private uncountStep(step: number) {
    let took = false;
    for (const r of this.ranks) {
      if (r.unsettled?.step !== step) continue;
      r.stats.steps -= 1;
      r.stats.samples -= r.unsettled.samples;
      r.unsettled = null;
      took = true;
    }
    if (took && this.lastStep === step) {
      this.stepsTakenPart -= 1;
      this.lastStep = step - 1;
    }
  }

  private fail(message: string, kind: "task" | "worker" | "ring" | "internal", rank?: number, where?: string) {
    if (this.ended) return;
    this.send({ t: "failed", rank, message, where, kind });
    void this.end(message);
  }

  private speed: number | undefined;
  private speedTimer: NodeJS.Timeout | null = null;

  private currentSpeed(): number {
    return this.speed ?? this.opts.speed ?? 1;
  }

  /** Re-read the speed file; tell the workers when the number in it changes. */
  private async pollSpeed() {
    if (!this.opts.speedFile) return;
    let text: string;
    try {
      text = await readFile(this.opts.speedFile, "utf8");
    } catch {
      return; // absent: keep the current speed
    }
    const value = Number(text.trim());
    if (!(value > 0 && value <= 1) || value === this.currentSpeed()) return;
    this.speed = value;
    this.log(`speed set to ${value} from ${this.opts.speedFile}`);
    for (const r of this.ranks) r.worker?.send({ op: "set_speed", speed: value });
  }

  private taskPath = "";
  private threads = 1;

  async start() {
    const { spec } = this;
    await this.pollSpeed();
    if (this.opts.speedFile) this.speedTimer = setInterval(() => void this.pollSpeed(), 500);
    this.dir = await mkdtemp(path.join(os.tmpdir(), "nimble-job-"));
    const taskPath = path.join(this.dir, spec.task.filename);
    await writeFile(taskPath, spec.task.code);
    this.taskPath = taskPath;
    this.threads = this.opts.threads ?? spec.threads ?? Math.max(1, Math.floor(os.cpus().length / this.ranks.length));
    for (const local of this.ranks) {
      this.spawnWorker(local);
      // A provider joining a running job waits for the coordinator's `ring` to connect.
      if (this.members.length > 1 && this.members.includes(local.rank)) void this.connectNext(local);
    }
  }

  private spawnWorker(local: LocalRank) {
    const { spec } = this;
    const taskPath = this.taskPath;
    const threads = this.threads;
    const label = `rank ${local.rank}`;
    const worker = new WorkerProcess({
      python: this.opts.python.python,
      cwd: this.dir,
      label,
      env: { NIMBLE_RANK: String(local.rank), NIMBLE_WORLD_SIZE: String(spec.world_size) },
      onLog: (line) => this.log(line),
    });
    local.worker = worker;
    this.setState(local, local.restarts > 0 ? "restarting" : "starting");
    worker.on("message", (m) => {
      let message: FromWorker;
      try {
        message = parseFromWorker(m, label);
      } catch (err) {
        this.fail(errorMessage(err), "internal", local.rank);
        return;
      }
      this.onWorkerMessage(local, message, m.payload);
    });
    worker.on("error", (err) => this.fail(`${label}: ${errorMessage(err)}`, "internal", local.rank));
    worker.on("exit", (exit) => {
      if (exit.expected || this.ended || local.worker !== worker) return;
      const how = exit.signal ? `was killed by ${exit.signal}` : `exited with code ${exit.code}`;
      const what = `worker for rank ${local.rank} on ${os.hostname()} ${how}`;
      // The rank leaves the ring (the coordinator re-forms it without it); the worker is
      // started again and rejoins, taking the state from a peer, up to faults.max_restarts.
      if (!local.left) this.leave(local, what);
      if (local.restarts >= this.maxRestarts) {
        const why = `${what}; it crashed ${local.restarts + 1} time${local.restarts === 0 ? "" : "s"} (faults.max_restarts is ${this.maxRestarts}), so it leaves the job`;
        this.hostLog(why, "error");
        this.setState(local, "left", `crashed ${local.restarts + 1} time${local.restarts === 0 ? "" : "s"}`);
        this.send({ t: "failed", rank: local.rank, message: why, kind: "worker" });
        if (this.ranks.every((r) => r.left && r.restarts >= this.maxRestarts)) void this.end(why);
        return;
      }
      local.restarts += 1;
      this.log(`restarting the worker for rank ${local.rank} (restart ${local.restarts} of ${this.maxRestarts})`, "warn");
      Object.assign(local, { ready: false, readyInfo: null, formed: -1, attempt: 0, lostEpoch: -1, queue: Promise.resolve(), restarting: true, unsettled: null });
      this.spawnWorker(local);
    });
    worker.send({
      op: "init",
      task_path: taskPath,
      config: spec.config,
      rank: local.rank,
      world_size: spec.world_size,
      device: local.device,
      threads,
      speed: this.currentSpeed(),
      ...(this.opts.maxMicroBatch ? { max_micro_batch: this.opts.maxMicroBatch } : {}),
    });
  }

  /** A ring neighbour silent past the heartbeat deadline is cut off: its link closes (1006). */
  private watchLink(link: FrameLink) {
    watchHeartbeat(link.ws, {
      timeoutMs: this.heartbeatMs,
      onDead: (silent) => this.log(`ring neighbour silent for ${(silent / 1000).toFixed(1)} s: dropping its link`, "warn"),
    });
  }

  /**
   * This rank's ring broke (a neighbour lost, a link cut, a bad frame): tell the coordinator
   * once per ring epoch. The worker stays in its collective until the coordinator's `abort`.
   */
  private ringLost(local: LocalRank, reason: string) {
    if (this.ended || local.left || local.lostEpoch === this.epoch) return;
    local.lostEpoch = this.epoch;
    this.hostLog(reason, "warn");
    this.send({ t: "ring_lost", rank: local.rank, epoch: this.epoch, reason });
  }

  /** A local rank leaves the job (its worker died): the coordinator re-forms the ring without it. */
  private leave(local: LocalRank, message: string) {
    local.left = true;
    local.ring?.abort(message);
    for (const link of [local.next, local.prev]) link?.close(CLOSE_REFORM, "rank left");
    local.next = local.prev = null;
    this.hostLog(message, "warn");
    this.send({ t: "failed", rank: local.rank, message, kind: "worker" });
  }

  /** Taking part in the ring now (not left out, lost, or still joining). */
  private inRing(local: LocalRank): boolean {
    return !local.left && this.members.includes(local.rank);
  }

  /** The members before and after `rank` in the current ring. */
  private neighbours(rank: number): { prev: number; next: number; position: number } {
    const n = this.members.length;
    const position = this.members.indexOf(rank);
    return { position, prev: this.members[(position - 1 + n) % n], next: this.members[(position + 1) % n] };
  }

  private async connectNext(local: LocalRank) {
    const epoch = this.epoch;
    const nextRank = this.neighbours(local.rank).next;
    const url = this.ringUrls.get(nextRank);
    if (!url) return this.fail(`the job names no address for rank ${nextRank}`, "internal", local.rank);
    const target = { url };
    const stale = () => this.ended || local.left || this.epoch !== epoch;
    const deadline = Date.now() + RING_CONNECT_TIMEOUT_MS;
    for (let attempt = 0; ; attempt++) {
      try {
        const link = await connectRingPeer(
          target.url,
          { job: this.spec.job, secret: this.spec.secret, from: local.rank, to: nextRank, epoch },
          this.linkOptions,
        );
        this.trackRingLink(link);
        if (stale()) {
          link.close(CLOSE_REFORM, "ring re-formed");
          return;
        }
        local.next = link;
        this.log(`ring link from rank ${local.rank} to rank ${nextRank} connected (epoch ${epoch})`, "debug");
        this.watchLink(link);
        link.onClose((code, reason) => {
          if (this.ended || local.next !== link) return;
          // The neighbour re-formed first: our own "ring" message is on its way.
          if (code === CLOSE_REFORM) local.next = null;
          else this.ringLost(local, `lost the ring link from rank ${local.rank} to rank ${nextRank} (${target.url}): ${describeClose(code, reason)}`);
        });
        this.maybeReady(local);
        return;
      } catch (err) {
        if (stale()) return;
        if (Date.now() > deadline) {
          return this.fail(`rank ${local.rank} cannot reach rank ${nextRank} at ${target.url}: ${errorMessage(err)}`, "ring", local.rank);
        }
        await new Promise((r) => setTimeout(r, Math.min(2000, 100 * 2 ** attempt)));
      }
    }
  }

  acceptRing(incoming: FrameLink) {
    this.trackRingLink(incoming);
    const ranks = new Set(this.ranks.map((r) => r.rank));
    acceptRingPeer(incoming, { job: this.spec.job, secret: this.spec.secret, ranks }, 10_000).then(
      (hello) => this.attachIncoming(hello),
      (err) => this.log(`refused a ring connection: ${errorMessage(err)}`, "warn"),
    );
  }

  private attachIncoming(hello: { from: number; to: number; epoch: number; link: FrameLink }) {
    const { from, to, epoch, link } = hello;
    if (this.ended || epoch < this.epoch) {
      link.close(CLOSE_REFORM, "ring re-formed");
      return;
    }
    if (epoch > this.epoch) {
      // The neighbour heard of the new ring before we did: hold the link until we do.
      this.early.push(hello);
      link.onClose(() => (this.early = this.early.filter((e) => e !== hello)));
      return;
    }
    const local = this.ranks.find((r) => r.rank === to)!;
    if (local.left || !this.members.includes(to) || from !== this.neighbours(to).prev || local.prev) {
      link.close(4002, "unexpected ring peer");
      return;
    }
    local.prev = link;
    this.watchLink(link);
    link.onClose((code, reason) => {
      if (this.ended || local.prev !== link) return;
      if (code === CLOSE_REFORM) local.prev = null;
      else this.ringLost(local, `lost the ring link into rank ${to} from rank ${from}: ${describeClose(code, reason)}`);
    });
    this.maybeReady(local);
  }

  private maybeReady(local: LocalRank) {
    if (local.left || !local.readyInfo) return;
    // Loaded but not in the ring (joining, or restarted): ready to be brought in.
    if (!this.members.includes(local.rank)) return this.announceReady(local);
    if (local.formed === this.epoch) return;
    const size = this.members.length;
    if (size > 1 && (!local.next || !local.prev)) return;
    const { position } = this.neighbours(local.rank);
    local.ring = new RingAllReduce({ rank: position, size, next: local.next, prev: local.prev });
    local.formed = this.epoch;
    if (!local.ready) return this.announceReady(local);
    local.worker?.send({ op: "ring", size });
    this.send({ t: "ring_ready", rank: local.rank, epoch: this.epoch });
  }

  /** Tell the coordinator the rank's worker is loaded: once per worker start. */
  private announceReady(local: LocalRank) {
    if (local.ready || !local.readyInfo) return;
    local.ready = true;
    const { op: _op, ...info } = local.readyInfo;
    this.send({ t: "ready", rank: local.rank, info });
  }

  /**
   * Re-form the ring with `members` only (a step boundary: no collective in flight). Links
   * of the old ring close with CLOSE_REFORM, which neighbours do not take for a fault;
   * local ranks left out stop their workers.
   */
  private reform(epoch: number, members: number[], urls: { rank: number; url: string }[]) {
    for (const u of urls) this.ringUrls.set(u.rank, u.url);
    if (epoch <= this.epoch) return this.fail(`ring epoch ${epoch} is not after ${this.epoch}`, "internal");
    if (new Set(members).size !== members.length || !members.every((r) => this.ringUrls.has(r))) {
      return this.fail(`ring members ${members.join(", ")} are not distinct ranks with known addresses`, "internal");
    }
    this.epoch = epoch;
    this.members = members;
    for (const local of this.ranks) {
      if (local.left) continue;
      local.ring = null;
      for (const link of [local.next, local.prev]) link?.close(CLOSE_REFORM, "ring re-formed");
      local.next = local.prev = null;
      // A local rank not named is out of the ring; its worker stops, unless it is one that
      // is (re)joining, whose turn comes with a later ring.
      if (!members.includes(local.rank) && local.ready && local.formed >= 0) {
        local.left = true;
        this.log(`rank ${local.rank} left out of the ring; stopping its worker`);
        this.setState(local, "left", "left out of the ring");
        void local.worker?.stop();
      }
    }
    for (const local of this.ranks) {
      if (local.left || !members.includes(local.rank)) continue;
      if (members.length > 1) void this.connectNext(local);
      else this.maybeReady(local);
    }
    const held = this.early;
    this.early = [];
    for (const hello of held) this.attachIncoming(hello);
  }

  /** Upload from this host to the provider of each local member's ring successor. */
  private async probeLinks(bytes: number) {
    const results = new Map<string, Promise<{ rtt_ms: number; upload_bytes_per_s: number }>>();
    for (const local of this.ranks.filter((r) => !r.left)) {
      const next = this.neighbours(local.rank).next;
      const url = this.ringUrls.get(next);
      const sameHost = this.ranks.some((r) => r.rank === next) || !url || this.members.length === 1;
      if (sameHost) {
        this.send({ t: "link", rank: local.rank, to: next, rtt_ms: null, upload_bytes_per_s: null });
        continue;
      }
      const base = url.replace(/\/ring$/, "");
      // One measurement per peer host, one at a time: they share this host's uplink.
      if (!results.has(base)) {
        const previous = [...results.values()].at(-1)?.catch(() => undefined) ?? Promise.resolve();
        results.set(
          base,
          previous.then(async () => {
            const m = await measurePeer(base, this.spec.secret, { pings: 5, bytes, throttle: this.linkOptions.throttle });
            return { rtt_ms: m.rtt_ms.median, upload_bytes_per_s: m.upload_bytes_per_s };
          }),
        );
      }
      try {
        const m = await results.get(base)!;
        this.send({ t: "link", rank: local.rank, to: next, ...m });
      } catch (err) {
        this.fail(`rank ${local.rank} could not measure its link to rank ${next} at ${base}: ${errorMessage(err)}`, "ring", local.rank);
      }
    }
  }

  private onWorkerMessage(local: LocalRank, m: FromWorker, payload: Buffer) {
    switch (m.op) {
      case "ready":
        local.readyInfo = m;
        if (local.restarting) {
          local.restarting = false;
          local.left = false;
        }
        this.setState(local, "ready");
        this.maybeReady(local);
        return;
      case "synced_state":
        this.send({ t: "synced_state", rank: local.rank, step: m.step, hash: m.hash });
        return;
      case "allreduce":
        // A request of an abandoned attempt is never served (its worker reads `abort` next).
        if (m.attempt !== local.attempt) return;
        local.queue = local.queue.then(() => this.allReduce(local, m.id, m.count, m.codec, payload, m.attempt));
        return;
      case "allgather":
        if (m.attempt !== local.attempt) return;
        local.queue = local.queue.then(() => this.allGather(local, m.id, payload, m.attempt));
        return;
      case "decided":
        this.send({ t: "decided", rank: local.rank, step: m.step, verdict: m.verdict, next_step: m.next_step, hash: m.hash });
        return;
      case "synced":
        void local.queue.then(() => {
          this.send({ t: "synced", rank: local.rank, hash: m.hash, bytes_sent: local.bytesSinceReport });
          local.bytesSinceReport = 0;
        });
        return;
      case "step_done": {
        const { op: _op, dense_count, ...report } = m;
        this.countStep(local, m.step, m.samples, m.compute_s, m.comm_s);
        const size = this.members.length;
        const { position } = this.neighbours(local.rank);
        // What one plain float32 all-reduce of the whole gradient would have sent from here.
        const uncompressed = size > 1 && dense_count > 0 ? expectedFrameBytesPerNode(dense_count, size, position, "f32") : 0;
        // Report after the collectives this step queued have finished counting their bytes.
        void local.queue.then(() => {
          this.send({ t: "step_done", rank: local.rank, ...report, bytes_sent: local.bytesSinceReport, uncompressed_bytes: uncompressed });
          local.bytesSinceReport = 0;
        });
        return;
      }
      case "eval_done":
        this.send({ t: "eval_done", rank: local.rank, step: m.step, count: m.count, sums: m.sums });
        return;
      case "state": {
        let offset = 0;
        const files = m.files.map((f) => {
          const data = payload.subarray(offset, offset + f.size);
          offset += f.size;
          return { name: f.name, data };
        });
        this.send({ t: "state", rank: local.rank, kind: m.kind, step: m.step, files });
        return;
      }
      case "loaded":
        this.send({ t: "loaded", rank: local.rank, step: m.step });
        return;
      case "error":
        if (m.kind === "config") {
          this.send({ t: "failed", rank: local.rank, message: m.message, field: m.field, kind: "config" });
          void this.end(m.message);
        } else this.fail(m.message, m.kind === "task" ? "task" : "worker", local.rank, m.where);
        return;
    }
  }

  private async allGather(local: LocalRank, id: number, payload: Buffer, attempt: number) {
    if (this.ended || !local.ring || !local.worker || local.attempt !== attempt) return;
    try {
      const { blobs, stats } = await local.ring.allGather(payload);
      local.bytesSinceReport += stats.bytesSent;
      if (local.attempt === attempt) local.worker.send({ op: "allgather_result", id, sizes: blobs.map((b) => b.byteLength) }, Buffer.concat(blobs));
    } catch (err) {
      this.ringLost(local, `ring all-gather failed on rank ${local.rank}: ${errorMessage(err)}`);
    }
  }

  private async allReduce(local: LocalRank, id: number, count: number, codec: WireCodec, payload: Buffer, attempt: number) {
    if (this.ended || !local.ring || !local.worker || local.attempt !== attempt) return;
    // Float32Array needs 4-byte alignment; the link decoder's slices need not have it.
    const data =
      payload.byteOffset % 4 === 0
        ? new Float32Array(payload.buffer, payload.byteOffset, count)
        : new Float32Array(payload.buffer.slice(payload.byteOffset, payload.byteOffset + count * 4));
    try {
      const stats = await local.ring.allReduce(data, { codec });
      local.bytesSinceReport += stats.bytesSent;
    } catch (err) {
      // The worker stays blocked in its collective until the coordinator's `abort`.
      this.ringLost(local, `ring all-reduce failed on rank ${local.rank}: ${errorMessage(err)}`);
      return;
    }
    if (local.attempt !== attempt) return;
    local.worker.send({ op: "allreduce_result", id, dtype: "float32", count, codec }, new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  }

  /** Orders carry the last round's decision to the worker unread (protocol v2). */
  handle(message: ToProvider) {
    switch (message.t) {
      case "sync":
        for (const r of this.ranks) if (this.inRing(r)) r.worker?.send({ op: "sync", source: message.source });
        return;
      case "ring":
        this.reform(message.epoch, message.members, message.urls ?? []);
        return;
      case "sync_state":
        for (const r of this.ranks) if (this.inRing(r)) r.worker?.send({ op: "sync_state", source: message.source, ...rides(message) });
        return;
      case "probe_links":
        void this.probeLinks(message.bytes);
        return;
      case "step":
        // One share per rank the job has had, joiners included.
        if (this.ranks.some((r) => r.rank >= message.shares.length) || message.shares.length < this.ringUrls.size) {
          this.fail(`step ${message.step} names ${message.shares.length} shares for ${this.ringUrls.size} ranks`, "internal");
          return;
        }
        for (const r of this.ranks) {
          if (!this.inRing(r)) continue;
          r.attempt += 1;
          r.worker?.send({ op: "step", step: message.step, shares: message.shares, want_hash: message.want_hash, attempt: r.attempt, ...rides(message) });
          this.setState(r, "training");
        }
        return;
      case "decide":
        if (message.verdict === "abort") {
          // Every rank's step attempt ends: collectives in flight are dropped, the workers
          // undo the step and answer `decided`. The ring is re-formed next (`ring`).
          this.uncountStep(message.step);
          for (const r of this.ranks) {
            if (!this.inRing(r)) continue;
            r.attempt += 1;
            r.ring?.abort(`step ${message.step} abandoned`);
            r.queue = Promise.resolve();
          }
        }
        for (const r of this.ranks) if (this.inRing(r)) r.worker?.send({ op: "decide", step: message.step, verdict: message.verdict });
        return;
      case "eval":
        for (const slice of message.slices) {
          const local = this.ranks.find((r) => r.rank === slice.rank);
          local?.worker?.send({ op: "eval", step: message.step, start: slice.start, count: slice.count, batch_size: message.batch_size, ...rides(message) });
        }
        return;
      case "state": {
        const local = this.ranks.find((r) => r.rank === message.rank);
        if (!local) return this.fail(`asked for the state of rank ${message.rank}, which this provider does not host`, "internal");
        local.worker?.send({ op: "state", kind: message.kind, ...rides(message) });
        return;
      }
      case "load_state": {
        const local = this.ranks.find((r) => r.rank === message.rank);
        if (!local) return this.fail(`asked to load state into rank ${message.rank}, which this provider does not host`, "internal");
        local.worker?.send(
          { op: "load_state", files: message.files.map((f) => ({ name: f.name, size: f.data.byteLength })) },
          Buffer.concat(message.files.map((f) => f.data)),
        );
        return;
      }
      default:
        return;
    }
  }

  /** Set once the job starts winding down; resolves when it has. */
  ending: Promise<void> | null = null;

  end(reason: string): Promise<void> {
    this.ending ??= this.finish(reason);
    return this.ending;
  }

  private async finish(reason: string) {
    this.ended = true;
    this.stopControlHeartbeat();
    clearInterval(this.statsTimer);
    if (this.speedTimer) clearInterval(this.speedTimer);
    for (const r of this.ranks) r.ring?.abort(reason);
    await Promise.all(this.ranks.map((r) => r.worker?.stop()));
    for (const r of this.ranks) {
      r.next?.close(1000, "job ended");
      r.prev?.close(1000, "job ended");
    }
    for (const e of this.early) e.link.close(1000, "job ended");
    if (this.dir) await rm(this.dir, { recursive: true, force: true });
    for (const r of this.ranks) if (r.state !== "left") this.setState(r, "stopped");
    // The final figures, whatever the interval: the job's totals as the coordinator counts them.
    this.emitStats();
    this.onEnd(reason);
  }
}

/** The decision an order carries, passed on to the worker as it came. */
function rides(message: { decision?: Decision }): { decision?: Decision } {
  return message.decision ? { decision: message.decision } : {};
}
