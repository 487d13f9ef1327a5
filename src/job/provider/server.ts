import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import type { IncomingMessage } from "node:http";
import { createServer, type Server } from "node:https";
import type { Duplex } from "node:stream";
import { WebSocketServer, type WebSocket } from "ws";
import { errorMessage, UserError } from "../../errors.js";
import type { Socket } from "node:net";
import { Authorizer, BAD_PROOF, CONTROL_BINDING, KEY_NOT_ALLOWED, WRONG_TOKEN } from "../../net/auth.js";
import { sessionBinding, tlsServerOptions } from "../../net/tls.js";
import { ConnectionCaps, limitMessages, WarningLimiter, WrongTokens } from "../../net/bounds.js";
import { CLOSE_AUTH_FAILED, FrameLink, readRingHello, type ArrivedHello, type LinkOptions } from "../../net/link.js";
import { BENCH_FRAME_BYTES, servePeerBench } from "../../net/peerBench.js";
import { MAX_FRAME_BYTES } from "../../protocol/frames.js";
import { jobSpecProblem, MAX_CONTROL_BYTES, PROTOCOL_VERSION, type LogLevel, type ProviderLimits, type ToCoordinator, type ToProvider } from "../../protocol/messages.js";
import { DEFAULT_LIMITS } from "../../runtime/limits.js";
import { cleanText } from "../../protocol/text.js";
import { cacheDir } from "../../runtime/paths.js";
import { installRequirements, lockHash, parseLock } from "../../runtime/requirements.js";
import { unpackPackage } from "../package.js";
import { ControlConnection, MAX_HELLO_BYTES, type ControlHost } from "./control.js";
import { linkPacing } from "./aids/pacing.js";
import { ProviderJob, type PreparedJob } from "./job.js";
import { Spares } from "./spares.js";
import type { JobSpec, ProviderOptions } from "./types.js";

/** Close code for a ring connection whose job never arrived here. */
const CLOSE_NO_SUCH_JOB = 4005;
/** How long a ring neighbour may take to connect once a job starts. */
const RING_CONNECT_TIMEOUT_MS = 60_000;
/**
 * A TCP connection that has not finished its HTTP upgrade this long is closed: idle
 * sockets and slowloris headers hold nothing for long. The WebSocket layer then has its
 * own hello timeouts.
 */
const UPGRADE_TIMEOUT_MS = 10_000;
/** Open TCP connections in all: a job needs a handful; this keeps file descriptors for them. */
const MAX_TCP_CONNECTIONS = 1024;

/**
 * `nimble provide`: a long-running agent. One WebSocket server carries the control plane
 * (`/control`, one coordinator at a time, token required) and the data plane (`/ring`,
 * neighbours in the current job's ring, job secret required).
 */
export class Provider {
  readonly token: string | null;
  /** What it was started with (the command reports its testing aids from them). */
  readonly options: ProviderOptions;
  private readonly auth: Authorizer;
  private server: Server | null = null;
  private readonly controlServer = new WebSocketServer({ noServer: true, maxPayload: MAX_CONTROL_BYTES });
  private readonly ringServer = new WebSocketServer({ noServer: true, maxPayload: MAX_FRAME_BYTES });
  private readonly benchServer = new WebSocketServer({ noServer: true, maxPayload: BENCH_FRAME_BYTES, perMessageDeflate: false });
  private job: ProviderJob | null = null;
  /** Ring hellos that arrived before their job: held (reading paused) until it does, or time out. */
  private pendingRing: { arrived: { hello: ArrivedHello; link: FrameLink }; release: () => void }[] = [];
  /** Connections not authenticated yet (control and ring): in all, and per address. */
  private readonly unauthenticated = new ConnectionCaps(256, 64);
  private readonly wrongTokens = new WrongTokens();
  private readonly warnings = new WarningLimiter();
  private readonly linkOptions: LinkOptions;
  /** Workers kept started for the next job (null: --no-warm). */
  private readonly spares: Spares | null;
  /** Per control connection: the job that ended on it, so late messages for it are not failures. */
  private readonly endedOn = new WeakMap<WebSocket, { job: string; reason: string }>();

  constructor(private readonly opts: ProviderOptions) {
    this.options = opts;
    const allow = opts.allow && opts.allow.length > 0 ? new Set(opts.allow) : null;
    this.token = allow ? null : (opts.token ?? randomBytes(16).toString("hex"));
    this.auth = new Authorizer(opts.identity, { token: this.token, allow });
    // The testing aids' pacing and latency, for every link of this host.
    this.linkOptions = linkPacing(opts.linkRate, opts.latencyMs);
    this.spares = opts.warm ? new Spares(opts, opts.devices.map((d) => d.id), (line, level) => this.log(line, level), (e) => opts.onEvent(e)) : null;
  }

  async start(): Promise<{ url: string; port: number }> {
    // Its torch import overlaps with the rest of the start-up and the first coordinator's hello.
    void this.spares?.fill();
    const server = createServer(
      {
        ...(await tlsServerOptions(this.opts.identity)),
        headersTimeout: UPGRADE_TIMEOUT_MS,
        requestTimeout: UPGRADE_TIMEOUT_MS,
        connectionsCheckingInterval: 1000,
      },
      (_req, res) => {
        res.writeHead(426, { "content-type": "text/plain" });
        res.end("nimble provider: connect with a WebSocket to /control\n");
      },
    );
    server.maxConnections = MAX_TCP_CONNECTIONS;
    // Until its upgrade (ws then clears the timeout: the WebSocket hello timeouts take over).
    // "connection" is the raw TCP socket, before TLS: a stalled TLS handshake is bounded too.
    server.on("connection", (socket: Socket) => {
      socket.setTimeout(UPGRADE_TIMEOUT_MS);
      socket.once("timeout", () => socket.destroy());
    });
    server.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      const pathname = new URL(req.url ?? "/", "http://x").pathname;
      if (pathname === "/bench") {
        // The provider's token, or the credential of the job it runs (ring members measuring their links).
        const accepts = (hello: Parameters<Authorizer["admitBench"]>[0], binding: Buffer | null) => this.auth.admitBench(hello, binding, this.job?.ringJob() ?? null);
        this.benchServer.handleUpgrade(req, socket, head, (ws) => servePeerBench(ws, accepts, this.opts.latencyMs));
        return;
      }
      const target = pathname === "/control" ? this.controlServer : pathname === "/ring" ? this.ringServer : null;
      if (!target) {
        socket.end("HTTP/1.1 404 Not Found\r\n\r\n");
        return;
      }
      target.handleUpgrade(req, socket, head, (ws) => (target === this.controlServer ? this.onControl(ws, req) : this.onRing(ws, req)));
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
    const url = `wss://${hostForUrl}:${port}`;
    const { key, fingerprint } = this.opts.identity;
    const allow = this.auth.mode === "key" ? [...(this.opts.allow ?? [])] : null;
    this.opts.onEvent({ type: "listening", url, host: this.opts.host, port, token: this.token, key, fingerprint, allow, limits: this.limits(), devices: this.opts.devices, profile: this.opts.profile ?? null, warm: this.spares !== null });
    return { url, port };
  }

  async close(): Promise<void> {
    await this.job?.end("provider shutting down");
    await this.spares?.close();
    for (const p of this.pendingRing) p.arrived.link.terminate();
    for (const ws of this.controlServer.clients) ws.terminate();
    for (const ws of this.ringServer.clients) ws.terminate();
    for (const ws of this.benchServer.clients) ws.terminate();
    this.benchServer.close();
    this.controlServer.close();
    this.ringServer.close();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  /** The owner's limits in force, as coordinators and the dashboard are told. */
  limits(): ProviderLimits {
    const limits = this.opts.limits ?? DEFAULT_LIMITS;
    return {
      sandbox: this.opts.confinement?.kind ?? "none",
      max_memory_bytes: limits.maxMemoryBytes,
      max_processes: limits.maxProcesses,
      max_file_bytes: limits.maxFileBytes,
      max_job_hours: this.opts.maxJobHours ?? null,
      job_requirements: this.opts.jobRequirements !== false,
    };
  }

  private log(line: string, level: LogLevel = "info") {
    this.opts.onEvent({ type: "log", line, level });
  }

  /** A coordinator's connection: admitted through its hello, then one at a time per job. */
  private onControl(ws: WebSocket, req: IncomingMessage) {
    const address = req.socket.remoteAddress ?? "unknown";
    const release = this.unauthenticated.admit(address);
    if (!release) {
      this.warn(`control:${address}`, `refused a connection from ${address}: too many connections waiting to authenticate`);
      ws.close(1013, "too many unauthenticated connections");
      return;
    }
    new ControlConnection(ws, req, this.controlHost, this.opts.latencyMs, release);
  }

  private readonly controlHost: ControlHost = {
    admit: (hello, conn) => {
      const address = conn.address;
      if (this.wrongTokens.blocked(address)) return { refusal: { code: CLOSE_AUTH_FAILED, reason: "too many wrong tokens or keys from this address; try again later" } };
      const decision = this.auth.admitCoordinator(hello, sessionBinding(conn.ws, CONTROL_BINDING), PROTOCOL_VERSION);
      if ("refusal" in decision && [WRONG_TOKEN, KEY_NOT_ALLOWED, BAD_PROOF].includes(decision.refusal.reason)) this.wrongTokens.note(address);
      return decision;
    },
    welcome: (conn) => this.welcome(conn),
    message: (conn, message) => this.onControlMessage(conn, message),
    closed: (conn) => {
      if (this.job && this.job.control === conn.ws) void this.job.end("coordinator disconnected");
      if (this.fetching?.conn === conn) this.fetching = null; // its chunks will not come
    },
    log: (line, level) => this.log(line, level),
  };

  /** An admitted coordinator's message: only the job's own coordinator reaches the job. */
  private onControlMessage(conn: ControlConnection, message: ToProvider) {
    if (message.t === "job") {
      if (this.job) return conn.send({ t: "failed", message: `already running job ${this.job.spec.job}`, kind: "internal" });
      if (this.fetching) return conn.send({ t: "failed", message: `already receiving the task package of job ${this.fetching.spec.job}`, kind: "internal" });
      if (this.installing) return conn.send({ t: "failed", message: `already installing the requirements of job ${this.installing.spec.job}`, kind: "internal" });
      const confinement = this.opts.confinement;
      if (confinement?.kind === "unavailable") {
        const why = `this provider refuses jobs: it cannot confine them (${confinement.reason}); its owner may start it with --no-sandbox to run jobs unconfined`;
        this.log(`refused job ${cleanText(message.job, 128)} from ${conn.from}: it cannot confine jobs (${confinement.reason})`, "warn");
        return conn.send({ t: "failed", message: why, kind: "internal" });
      }
      const problem = jobSpecProblem(message, this.opts.devices);
      if (problem) return conn.send({ t: "failed", message: problem, kind: "internal" });
      return void this.#prepare(message, conn);
    }
    if (message.t === "package_chunk") return void this.#packageChunk(message, conn);
    if (this.job && this.job.control !== conn.ws) {
      this.warn(`foreign:${conn.address}`, `ignoring ${message.t} from ${conn.from}: job ${this.job.spec.job} belongs to another coordinator`);
      return;
    }
    const ended = this.endedOn.get(conn.ws) ?? null;
    if (!this.job) {
      // A job this provider left (its workers kept crashing) may still get the job's
      // messages for a moment: they are moot, not a failure.
      if (ended !== null) conn.send({ t: "log", line: `left job ${ended.job} (${ended.reason}); ignoring ${message.t}` });
      else if (message.t !== "cancel") conn.send({ t: "failed", message: `no job is running; got ${message.t}`, kind: "internal" });
      return;
    }
    if (message.t === "cancel") return void this.job.end(`cancelled by coordinator: ${message.reason}`);
    this.job.handle(message);
  }

  /**
   * Welcome an authenticated coordinator, or refuse it while another job runs. A job that is
   * only winding down (workers stopping after a cancel) is waited for, so a coordinator that
   * reconnects right after its previous job is not turned away.
   */
  private async welcome(conn: ControlConnection): Promise<boolean> {
    if (this.job?.ending) await Promise.race([this.job.ending, new Promise((r) => setTimeout(r, 10_000))]);
    if (this.job) {
      conn.send({ t: "reject", reason: `busy with job ${this.job.spec.job}` });
      return false;
    }
    const binding = sessionBinding(conn.ws, CONTROL_BINDING)!;
    conn.send({
      t: "welcome",
      ...this.auth.welcomeProof(conn.coordinator!.nonce, binding),
      version: PROTOCOL_VERSION,
      provider: {
        id: `${os.hostname()}:${this.opts.port}`,
        hostname: os.hostname(),
        python: this.opts.python.pythonVersion,
        torch: this.opts.python.torchVersion,
        devices: this.opts.devices,
        ...(this.opts.profile ? { profile: this.opts.profile } : {}),
        limits: this.limits(),
      },
    });
    return true;
  }

  /** What a job needs before its workers start: its requirements installed, then its package. */
  async #prepare(spec: JobSpec, conn: ControlConnection) {
    const prepared: PreparedJob = {};
    if (spec.requirements) {
      this.installing = { spec, conn };
      try {
        prepared.requirementsDir = await this.#requirements(spec, conn);
      } catch (err) {
        const why = cleanText(errorMessage(err), 4000, { multiline: true });
        this.log(`job ${cleanText(spec.job, 128)}: ${why}`, "warn");
        return conn.send({ t: "failed", message: `provider ${os.hostname()}:${this.opts.port}: ${why}`, kind: "requirements" });
      } finally {
        this.installing = null;
      }
      if (conn.ws.readyState !== conn.ws.OPEN) return; // the coordinator left meanwhile (the install stays cached)
    }
    if (spec.package) return this.#withPackage(spec, conn, prepared);
    this.startJob(spec, conn, prepared);
  }

  /** The job's requirements installed (or found in the cache), unless the owner forbids per-job installs. */
  async #requirements(spec: JobSpec, conn: ControlConnection): Promise<string> {
    const { lock, hash } = spec.requirements!;
    if (this.opts.jobRequirements === false) {
      throw new Error(`refuses jobs that bring requirements (its owner started it with --no-job-requirements); this job needs ${lock.split("\n").filter(Boolean).length} package(s) beyond the base environment`);
    }
    if (lockHash(lock) !== hash) throw new Error(`the requirements lock does not hash to ${hash.slice(0, 12)}`);
    parseLock(lock); // nothing but name==version --hash lines reaches pip
    const tell = (line: string) => {
      this.log(line.startsWith("  ") ? line : `job ${cleanText(spec.job, 128)}: ${line}`, line.startsWith("  ") ? "debug" : "info");
      conn.send({ t: "log", line: cleanText(line, 1000), level: line.startsWith("  ") ? "debug" : "info" });
    };
    const started = Date.now();
    const { dir, cached } = await installRequirements(lock, this.opts.python.python, { onProgress: tell });
    tell(cached ? `requirements ${hash.slice(0, 12)} are installed here already` : `installed requirements ${hash.slice(0, 12)} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    return dir;
  }

  /** A job whose task is a package: from the cache, or asked for (`package_needed`) and received in chunks. */
  async #withPackage(spec: JobSpec, conn: ControlConnection, prepared: PreparedJob) {
    const { hash, bytes } = spec.package!;
    const dir = path.join(cacheDir(), "packages", hash);
    if (existsSync(dir)) {
      this.log(`task package ${hash.slice(0, 12)} is cached here`, "debug");
      return this.startJob(spec, conn, { ...prepared, packageDir: dir });
    }
    this.fetching = { spec, conn, dir, chunks: [], received: 0, prepared };
    this.log(`fetching task package ${hash.slice(0, 12)} (${(bytes / 1e6).toFixed(1)} MB) from ${conn.from}`);
    conn.send({ t: "package_needed", hash });
  }

  async #packageChunk(m: Extract<ToProvider, { t: "package_chunk" }>, conn: ControlConnection) {
    const f = this.fetching;
    const fail = (why: string) => {
      this.fetching = null;
      conn.send({ t: "failed", message: `task package: ${why}`, kind: "internal" });
    };
    if (!f || f.conn !== conn || m.hash !== f.spec.package!.hash) return fail(`got a chunk of ${m.hash.slice(0, 12)}, which this provider did not ask for`);
    if (m.offset !== f.received || f.received + m.data.byteLength > f.spec.package!.bytes) return fail(`chunk at ${m.offset} does not follow the ${f.received} bytes received`);
    f.chunks.push(Buffer.from(m.data));
    f.received += m.data.byteLength;
    if (f.received < f.spec.package!.bytes) return;
    this.fetching = null;
    const blob = Buffer.concat(f.chunks);
    const got = createHash("sha256").update(blob).digest("hex");
    if (got !== m.hash) return fail(`received bytes hash to ${got.slice(0, 12)}, not ${m.hash.slice(0, 12)}`);
    try {
      await unpackPackage(blob, f.dir);
    } catch (err) {
      return fail(cleanText(errorMessage(err), 1000));
    }
    this.log(`task package ${m.hash.slice(0, 12)} received and cached`);
    this.startJob(f.spec, conn, { ...f.prepared, packageDir: f.dir });
  }

  /** A package being received for a job that starts once it is whole. */
  private fetching: { spec: JobSpec; conn: ControlConnection; dir: string; chunks: Buffer[]; received: number; prepared: PreparedJob } | null = null;
  /** A job whose requirements are being installed. */
  private installing: { spec: JobSpec; conn: ControlConnection } | null = null;

  private startJob(spec: JobSpec, conn: ControlConnection, prepared: PreparedJob = {}) {
    const send = (m: ToCoordinator) => conn.send(m);
    const coordinator = conn.coordinator!;
    const job = new ProviderJob(spec, this.opts, send, conn.ws, conn.bytes, (line, level) => this.log(line, level), this.linkOptions, this.auth, coordinator.key, prepared, this.spares);
    this.job = job;
    this.opts.onEvent({
      type: "job",
      job: spec.job,
      name: String(spec.config.name ?? ""),
      ranks: spec.ranks.map((r) => r.rank),
      world_size: spec.world_size,
      coordinator: { fingerprint: coordinator.fingerprint, key: coordinator.key, address: conn.address },
      task_sha256: spec.package ? spec.package.hash : createHash("sha256").update(spec.task.code).digest("hex"),
    });
    job.onEnd = (reason) => {
      if (this.job === job) this.job = null;
      this.endedOn.set(conn.ws, { job: spec.job, reason });
      this.opts.onEvent({ type: "job_end", job: spec.job, reason });
      // The next job gets a fresh spare for each one this job took.
      void this.spares?.fill();
    };
    void job.start().catch((err) => {
      send({ t: "failed", message: errorMessage(err), kind: "internal" });
      void job.end(errorMessage(err));
    });
    const pending = this.pendingRing;
    this.pendingRing = [];
    for (const p of pending) {
      p.release();
      job.acceptHello(p.arrived);
    }
  }

  /**
   * A ring connection: nothing is read but its hello (at most MAX_HELLO_BYTES), and then
   * nothing more until its job admits it. Without a job yet, the hello waits (reading
   * paused) up to RING_CONNECT_TIMEOUT_MS, within the caps on unauthenticated connections.
   */
  private onRing(ws: WebSocket, req: IncomingMessage) {
    const address = req.socket.remoteAddress ?? "unknown";
    const release = this.unauthenticated.admit(address);
    if (!release) {
      this.warn(`ring:${address}`, `refused a ring connection from ${address}: too many connections waiting to authenticate`);
      ws.close(1013, "too many unauthenticated connections");
      return;
    }
    limitMessages(ws, MAX_HELLO_BYTES);
    // Wrap at once: a FrameLink keeps frames (the hello) that arrive before anyone listens.
    const link = new FrameLink(ws, this.linkOptions);
    link.onClose(() => release());
    readRingHello(link, 10_000).then(
      (arrived) => {
        if (this.job) {
          release();
          return this.job.acceptHello(arrived);
        }
        const pending = { arrived, release };
        this.pendingRing.push(pending);
        const timer = setTimeout(() => {
          this.pendingRing = this.pendingRing.filter((p) => p !== pending);
          link.close(CLOSE_NO_SUCH_JOB, "no such job");
        }, RING_CONNECT_TIMEOUT_MS);
        link.onClose(() => {
          clearTimeout(timer);
          this.pendingRing = this.pendingRing.filter((p) => p !== pending);
        });
      },
      (err) => this.warn(`ring:${address}`, `refused a ring connection from ${address}: ${cleanText(errorMessage(err), 1000)}`),
    );
  }

  /** A warning about an outsider, at most one line per peer and kind every few seconds. */
  private warn(key: string, line: string) {
    const out = this.warnings.pass(key, line);
    if (out) this.log(out, "warn");
  }
}
