import { randomBytes } from "node:crypto";
import os from "node:os";
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { Duplex } from "node:stream";
import { WebSocketServer, type WebSocket } from "ws";
import { errorMessage, UserError } from "../../errors.js";
import { TokenAuthorizer, type Authorizer } from "../../net/auth.js";
import { afterLatency, FrameLink, type LinkOptions } from "../../net/link.js";
import { BENCH_FRAME_BYTES, servePeerBench } from "../../net/peerBench.js";
import { MAX_FRAME_BYTES } from "../../protocol/frames.js";
import { decodeToProvider, encodeMessage, MAX_CONTROL_BYTES, PROTOCOL_VERSION, type LogLevel, type ToCoordinator, type ToProvider } from "../../protocol/messages.js";
import { linkPacing } from "./aids/pacing.js";
import { ProviderJob } from "./job.js";
import type { JobSpec, LinkBytes, ProviderOptions } from "./types.js";

/** Close code for a ring connection whose job never arrived here. */
const CLOSE_NO_SUCH_JOB = 4005;
/** How long a ring neighbour may take to connect once a job starts. */
const RING_CONNECT_TIMEOUT_MS = 60_000;

/**
 * `nimble provide`: a long-running agent. One WebSocket server carries the control plane
 * (`/control`, one coordinator at a time, token required) and the data plane (`/ring`,
 * neighbours in the current job's ring, job secret required).
 */
export class Provider {
  readonly token: string;
  private readonly auth: Authorizer;
  private server: Server | null = null;
  private readonly controlServer = new WebSocketServer({ noServer: true, maxPayload: MAX_CONTROL_BYTES });
  private readonly ringServer = new WebSocketServer({ noServer: true, maxPayload: MAX_FRAME_BYTES });
  private readonly benchServer = new WebSocketServer({ noServer: true, maxPayload: BENCH_FRAME_BYTES, perMessageDeflate: false });
  private job: ProviderJob | null = null;
  /** Ring connections that arrived before their job: held until it does, or time out. */
  private pendingRing: FrameLink[] = [];
  private readonly linkOptions: LinkOptions;
  /** Per control connection: the job that ended on it, so late messages for it are not failures. */
  private readonly endedOn = new WeakMap<WebSocket, { job: string; reason: string }>();

  constructor(private readonly opts: ProviderOptions) {
    this.token = opts.token ?? randomBytes(16).toString("hex");
    this.auth = new TokenAuthorizer(this.token);
    // The testing aids' pacing and latency, for every link of this host.
    this.linkOptions = linkPacing(opts.linkRate, opts.latencyMs);
  }

  async start(): Promise<{ url: string; port: number }> {
    const server = createServer((_req, res) => {
      res.writeHead(426, { "content-type": "text/plain" });
      res.end("nimble provider: connect with a WebSocket to /control\n");
    });
    server.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      const pathname = new URL(req.url ?? "/", "http://x").pathname;
      if (pathname === "/bench") {
        // The provider's token, or the credential of the job it runs (ring members measuring their links).
        const accepts = (given: string) => this.auth.admitBench(given, this.job?.spec ?? null);
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
        const refusal = this.auth.admitCoordinator(message, PROTOCOL_VERSION);
        if (refusal) {
          this.log(`rejected ${from}: ${refusal.reason}`, "warn");
          send({ t: "reject", reason: refusal.reason });
          ws.close(refusal.code, refusal.reason === "wrong token" ? "wrong token" : "protocol mismatch");
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
    const job = new ProviderJob(spec, this.opts, send, ws, controlBytes, (line, level) => this.log(line, level), this.linkOptions, this.auth);
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

/** Bytes of one WebSocket message as ws hands it over. */
function rawDataLength(data: Buffer | ArrayBuffer | Buffer[]): number {
  return Array.isArray(data) ? data.reduce((n, b) => n + b.byteLength, 0) : data.byteLength;
}
