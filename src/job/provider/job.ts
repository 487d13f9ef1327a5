import { mkdir, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type { WebSocket } from "ws";
import { DirectMeshes, isDirectGroup } from "../../collective/directMesh.js";
import { GroupMeshes, type GroupSpec } from "../../collective/groups.js";
import { Mesh } from "../../collective/mesh.js";
import { errorMessage } from "../../errors.js";
import type { Authorizer, RingJob } from "../../net/auth.js";
import { watchHeartbeat } from "../../net/heartbeat.js";
import { limitMessages, WarningLimiter } from "../../net/bounds.js";
import { admitRingHello, type ArrivedHello, type FrameLink, type LinkOptions } from "../../net/link.js";
import { MAX_FRAME_BYTES } from "../../protocol/frames.js";
import { cleanText, MAX_PEER_TEXT } from "../../protocol/text.js";
import { REPORT_PART_BYTES, type LogLevel, type ToCoordinator, type ToProvider } from "../../protocol/messages.js";
import { parseFromWorker, type FromWorker } from "../../protocol/workerOps.js";
import type { WorkerProcess, WorkerExit } from "../../runtime/worker.js";
import { handOffLine, jobFolder, launchWorker, workerSetup, type Spares } from "./spares.js";
import { SpeedAid } from "./aids/speed.js";
import { probeLinks } from "./probe.js";
import { MirrorStore } from "./mirrors.js";
import { LocalRank } from "./rank.js";
import { Relay } from "./relay.js";
import { JobStats } from "./stats.js";
import type { JobSpec, LinkBytes, ProviderOptions } from "./types.js";

type FailKind = "task" | "worker" | "ring" | "internal";

export interface PreparedJob {
  /** The unpacked task package, for a task that is a folder. */
  packageDir?: string;
  /** The job's requirements, installed (src/runtime/requirements.ts): on the workers' module path after the base's. */
  requirementsDir?: string;
}

/** One job on this provider: its workers, their ring, and the orders and reports between them. */
export class ProviderJob {
  readonly ranks: LocalRank[];
  readonly mesh: Mesh;
  /** Pipeline parallelism: the stage rings and pipes this host's ranks belong to (none otherwise). */
  readonly groups: GroupMeshes;
  /** The direct all-reduce's links (config `collective`): from each local rank to every other member; null: ring only. */
  readonly direct: DirectMeshes | null;
  readonly #stats: JobStats;
  readonly #relay: Relay;
  readonly #speed: SpeedAid;
  readonly #warnings = new WarningLimiter();
  readonly #maxRestarts: number;
  readonly #heartbeatMs: number;
  readonly #stopControlHeartbeat: () => void;
  #dir = "";
  #taskPath = "";
  /** The task package's folder as the workers see it (in the job folder when a warm worker took the job). */
  #packageDir: string | undefined;
  #threads = 1;
  #ended = false;
  onEnd: (reason: string) => void = () => {};
  /** Set once the job starts winding down; resolves when it has. */
  ending: Promise<void> | null = null;

  constructor(
    readonly spec: JobSpec,
    private readonly opts: ProviderOptions,
    private readonly send: (m: ToCoordinator) => void,
    readonly control: WebSocket,
    controlBytes: LinkBytes,
    /** This host's own log (its view); `log` below also tells the coordinator. */
    private readonly hostLog: (line: string, level?: LogLevel) => void,
    private readonly linkOptions: LinkOptions,
    private readonly auth: Authorizer,
    /** The key of the coordinator that started the job: its credentials are what ring peers show. */
    readonly coordinatorKey: string,
    /** What was fetched for the job before it started: shared through the cache, read-only to workers. */
    private readonly prepared: PreparedJob = {},
    /** Warm spares this job's ranks may take (null: the owner turned them off). */
    private readonly spares: Spares | null = null,
  ) {
    const faults = spec.config.faults as { max_restarts?: unknown; heartbeat_s?: unknown } | undefined;
    const maxRestarts = Number(faults?.max_restarts);
    this.#maxRestarts = Number.isInteger(maxRestarts) && maxRestarts >= 0 ? maxRestarts : 3;
    const heartbeat = Number(faults?.heartbeat_s);
    this.#heartbeatMs = heartbeat >= 0.5 && heartbeat <= 3600 ? heartbeat * 1000 : 10_000;
    this.#stopControlHeartbeat = watchHeartbeat(control, {
      timeoutMs: this.#heartbeatMs,
      onDead: (silent) => void this.end(`the coordinator was silent for ${(silent / 1000).toFixed(1)} s`),
    });
    this.ranks = spec.ranks.map((r) => new LocalRank(r.rank, r.device, (event) => opts.onEvent({ type: "worker", job: spec.job, ...event })));
    this.#stats = new JobStats({ job: spec.job, name: String(spec.config.name ?? "") }, spec.ranks, controlBytes, (e) => opts.onEvent(e));
    this.#speed = new SpeedAid(opts.speed, opts.speedFile, (speed, file) => {
      this.log(`speed set to ${speed} from ${file}`);
      for (const r of this.ranks) r.worker?.send({ op: "set_speed", speed });
    });
    // The ring's and the groups' links report alike: a rank linked, lost, a failure, a line, bytes.
    const linkEvents = {
      linked: (rank: number) => this.#linked(rank),
      lost: (rank: number, epoch: number, reason: string) => this.#ringLost(rank, epoch, reason),
      fail: (message: string, rank?: number) => this.fail(message, "ring", rank),
      log: (line: string, level: "debug" | "info" | "warn") => this.log(line, level),
      track: (link: FrameLink) => this.#stats.track(link),
    };
    this.mesh = new Mesh(
      {
        local: spec.ranks.map((r) => r.rank),
        // Joining a running job: no ring until the coordinator's `ring` brings this provider in.
        members: spec.join ? [] : [...Array(spec.world_size).keys()],
        peers: new Map(spec.ring.map((r) => [r.rank, { url: r.url, key: r.key }])),
        hello: (from, to, epoch, binding) => auth.ringHello(spec, from, to, epoch, binding),
        heartbeatMs: this.#heartbeatMs,
        link: linkOptions,
      },
      linkEvents,
    );
    this.groups = new GroupMeshes(
      {
        local: spec.ranks.map((r) => r.rank),
        peers: new Map(spec.ring.map((r) => [r.rank, { url: r.url, key: r.key }])),
        hello: (group, from, to, epoch, binding) => auth.ringHello(spec, from, to, epoch, binding, group),
        heartbeatMs: this.#heartbeatMs,
        link: linkOptions,
      },
      linkEvents,
      spec.join ? [] : (spec.pipeline?.groups ?? []),
    );
    const direct = spec.collective;
    this.direct =
      direct && !spec.pipeline
        ? new DirectMeshes(
            {
              local: spec.ranks.map((r) => r.rank),
              members: spec.join ? [] : [...Array(spec.world_size).keys()],
              minMembers: direct.direct_min_members,
              maxMembers: direct.direct_max_members,
              peers: new Map(spec.ring.map((r) => [r.rank, { url: r.url, key: r.key }])),
              hello: (group, from, to, epoch, binding) => auth.ringHello(spec, from, to, epoch, binding, group),
              heartbeatMs: this.#heartbeatMs,
              link: linkOptions,
            },
            linkEvents,
          )
        : null;
    this.#relay = new Relay({
      rank: (rank) => this.#local(rank),
      inRing: (rank) => this.mesh.inRing(rank) && !!this.#local(rank)?.loaded,
      ringOf: (rank) => (this.#ended ? null : this.mesh.ringOf(rank)),
      directOf: (rank) => (this.#ended ? null : (this.direct?.reducerOf(rank) ?? null)),
      stageRingOf: (rank) => (this.#ended ? null : this.groups.hasStageRing(rank) ? this.groups.stageRing(rank) : "lone"),
      pipeOf: (rank, peer) => (this.#ended ? null : this.groups.pipe(rank, peer)),
      abortAttempts: (step) => this.#abortAttempts(step),
      send: (m) => this.send(m),
      sendInParts: (report, payload) => this.#sendInParts(report, payload),
      loaded: (local, m) => this.#loaded(local, m),
      workerError: (local, m) => this.#workerError(local, m),
      ringLost: (local, reason) => this.#ringLost(local.rank, this.mesh.epoch, reason),
      observe: (rank, report) => this.#stats.observe(rank, report),
      fail: (message, kind, rank) => this.fail(message, kind, rank),
    });
  }

  /**
   * This job's lines (its workers' output, restarts, ring links): on this host's view and in
   * the coordinator's run log. What the coordinator learns from a message of its own
   * (failed, ring_lost) goes to hostLog only, so it is not shown twice.
   */
  log(line: string, level: LogLevel = "info"): void {
    // A worker's output is the task's text: control characters out, over-long lines cut.
    const clean = cleanText(line, MAX_PEER_TEXT);
    this.hostLog(clean, level);
    this.send({ t: "log", line: clean, level });
  }

  async start(): Promise<void> {
    await this.#speed.start();
    const claim = this.spares?.claim(this.ranks, (device) => ({ ...this.#setup(device, false), requirements: this.spec.requirements?.hash ?? null })) ?? null;
    ({ dir: this.#dir, packageDir: this.#packageDir } = await jobFolder(claim, this.prepared.packageDir));
    // Not in the worker's cwd (the first entry of its sys.path): a task named torch.py or
    // json.py must not shadow the module of that name.
    if (this.#packageDir) {
      this.#taskPath = path.join(this.#packageDir, this.spec.package!.entry);
    } else {
      await mkdir(path.join(this.#dir, "task"));
      this.#taskPath = path.join(this.#dir, "task", this.spec.task.filename);
      await writeFile(this.#taskPath, this.spec.task.code);
    }
    this.#threads = this.opts.threads ?? this.spec.threads ?? Math.max(1, Math.floor(os.cpus().length / this.ranks.length));
    for (const local of this.ranks) {
      const line = claim && handOffLine(claim, local.rank);
      if (line) this.log(line);
      this.#spawn(local, claim?.workers.get(local.rank));
    }
    this.mesh.start();
    this.groups.start();
    this.direct?.start();
    const hours = this.opts.maxJobHours;
    if (hours) {
      this.#deadline = setTimeout(() => this.fail(`the job ran for ${hours} h, this provider's limit (--max-job-hours): its owner ends it here`, "internal"), hours * 3600_000);
      this.#deadline.unref();
    }
  }

  /** Pipeline: the states this host keeps of other providers' sole-held stages. */
  readonly #mirrors = new MirrorStore();

  /** Receive a stage's state from its holder over the pipe to local rank `rank`, and keep it. */
  async #mirrorTake(rank: number, from: number, stage: number, tag: string) {
    const pipe = this.groups.pipe(rank, from);
    if (!this.#local(rank) || !pipe) return this.fail(`asked to keep stage ${stage}'s state at rank ${rank} from rank ${from}, with no pipe between them`, "internal");
    try {
      this.send({ t: "mirror_kept", rank, stage, tag, bytes: await this.#mirrors.take(pipe, stage, tag) });
    } catch (err) {
      this.#ringLost(rank, this.mesh.epoch, `keeping stage ${stage}'s state from rank ${from} failed: ${errorMessage(err)}`);
    }
  }

  /** Send the kept state of `stage` from local rank `rank` to its replacement `to`. */
  async #mirrorGive(rank: number, to: number, stage: number, tag: string) {
    const pipe = this.groups.pipe(rank, to);
    const local = this.#local(rank);
    if (!local || !pipe || !this.#mirrors.has(stage)) return this.fail(`asked for stage ${stage}'s kept state at rank ${rank}, which ${pipe ? "keeps none" : `has no pipe to rank ${to}`}`, "internal");
    try {
      local.bytesSinceReport += await this.#mirrors.give(pipe, stage, tag);
    } catch (err) {
      this.#ringLost(rank, this.mesh.epoch, `sending stage ${stage}'s kept state to rank ${to} failed: ${errorMessage(err)}`);
    }
  }

  /** Set when the owner limits how long a job may run (--max-job-hours). */
  #deadline: NodeJS.Timeout | undefined;

  /** The coordinator's messages for this job (hello, job and cancel are the server's). */
  handle(message: ToProvider): void {
    if (message.t === "order") this.#relay.order(message);
    else if (message.t === "ring") this.#reform(message.epoch, message.members, message.urls ?? [], message.groups ?? []);
    else if (message.t === "mirror_take") void this.#mirrorTake(message.rank, message.from, message.stage, message.tag);
    else if (message.t === "mirror_give") void this.#mirrorGive(message.rank, message.to, message.stage, message.tag);
    else if (message.t === "probe_links") void probeLinks(this, message.bytes, (binding) => this.auth.benchHello(this.spec, binding), this.linkOptions.throttle, this.linkOptions.latencyMs);
  }

  /** An incoming ring connection's hello: admitted by the Authorizer (reading resumes), then the mesh's. */
  acceptHello(arrived: { hello: ArrivedHello; link: FrameLink }): void {
    const ranks = new Set(this.ranks.map((r) => r.rank));
    try {
      const hello = admitRingHello(arrived, (h, binding) => this.auth.admitRingPeer(h, binding, this.ringJob(ranks)));
      limitMessages(arrived.link.ws, MAX_FRAME_BYTES);
      if (hello.group !== undefined && isDirectGroup(hello.group) && this.direct) this.direct.accept({ ...hello, group: hello.group });
      else if (hello.group !== undefined) this.groups.accept({ ...hello, group: hello.group });
      else this.mesh.accept(hello);
    } catch (err) {
      const line = this.#warnings.pass("ring refused", `refused a ring connection: ${cleanText(errorMessage(err), 1000)}`);
      if (line) this.hostLog(line, "warn");
    }
  }

  /** What ring and bench hellos for this job are checked against. */
  ringJob(ranks: ReadonlySet<number> = new Set(this.ranks.map((r) => r.rank))): RingJob {
    return { job: this.spec.job, coordinatorKey: this.coordinatorKey, ranks };
  }

  #local(rank: number): LocalRank | undefined {
    return this.ranks.find((r) => r.rank === rank);
  }

  sendLink(message: Extract<ToCoordinator, { t: "link" }>): void {
    this.send(message);
  }

  fail(message: string, kind: FailKind, rank?: number, where?: string): void {
    if (this.#ended) return;
    // A task's exception may be long: its head and tail (where the real error is) are kept.
    const text = cleanText(message, MAX_PEER_TEXT, { multiline: true });
    this.send({ t: "failed", rank, message: text, where: where === undefined ? undefined : cleanText(where, 512), kind });
    void this.end(text);
  }

  #spawn(local: LocalRank, warm?: WorkerProcess) {
    const label = `rank ${local.rank}`;
    const env = { NIMBLE_RANK: String(local.rank), NIMBLE_WORLD_SIZE: String(this.spec.world_size) };
    const onLog = (line: string) => this.log(line);
    const setup = this.#setup(local.device);
    const worker = warm ?? launchWorker(this.opts, setup, { cwd: this.#dir, label, env, onLog, cgroup: `nimble-${process.pid}-${path.basename(this.#dir)}-rank${local.rank}-${local.restarts}` });
    if (warm) Object.assign(warm, { label, onLog });
    const limits = setup.limits;
    local.worker = worker;
    local.announce();
    worker.on("message", (m) => {
      let message: FromWorker;
      try {
        message = parseFromWorker(m, label);
      } catch (err) {
        return this.fail(errorMessage(err), "internal", local.rank);
      }
      this.#relay.fromWorker(local, message, m.payload);
    });
    worker.on("error", (err) => this.fail(`${label}: ${errorMessage(err)}`, "internal", local.rank));
    worker.on("exit", (exit) => this.#exited(local, worker, exit));
    local.startup = { warm: Boolean(warm), initAt: performance.now() };
    worker.send({
      op: "init",
      env,
      task_path: this.#taskPath,
      config: this.spec.config,
      rank: local.rank,
      world_size: this.spec.world_size,
      device: local.device,
      threads: this.#threads,
      speed: this.#speed.current,
      ...(this.opts.maxMicroBatch ? { max_micro_batch: this.opts.maxMicroBatch } : {}),
      limits: { max_processes: limits.maxProcesses, max_file_bytes: limits.maxFileBytes, max_memory_bytes: limits.maxMemoryBytes },
      ...(this.#packageDir ? { package_dir: this.#packageDir } : {}),
      ...(this.prepared.requirementsDir ? { site_dirs: [this.prepared.requirementsDir] } : {}),
      ...(this.spec.pipeline ? { pipeline: { stage: this.spec.pipeline.stage_of[local.rank] ?? 0, stages: this.spec.pipeline.stages, bounds: this.spec.pipeline.bounds } } : {}),
      ...(worker.sharedFd !== undefined ? { shared_fd: worker.sharedFd } : {}),
    });
  }

  /** What a cold start of a worker on `device` makes (a warm spare must be the same); a package copied into the job folder needs no bind. */
  #setup(device: string, bindPackage = this.#packageDir === this.prepared.packageDir) {
    const extra = [bindPackage ? this.prepared.packageDir : undefined, this.prepared.requirementsDir].filter((d): d is string => d !== undefined);
    return workerSetup(this.opts, device, extra);
  }

  /**
   * A worker died: its rank leaves the ring (the coordinator re-forms it without it), and
   * the worker starts again and rejoins with a peer's state, up to faults.max_restarts.
   */
  #exited(local: LocalRank, worker: WorkerProcess, exit: WorkerExit) {
    if (exit.expected || this.#ended || local.worker !== worker) return;
    if (exit.fault) {
      // Ended by the owner's limits: starting it again would only hit them again.
      const why = `worker for rank ${local.rank} on ${os.hostname()} ${exit.fault}, so it leaves the job`;
      this.mesh.leave(local.rank, why);
      this.groups.leave(local.rank, why);
      this.direct?.leave(local.rank, why);
      this.hostLog(why, "error");
      local.on("left", exit.fault);
      this.send({ t: "failed", rank: local.rank, message: why, kind: "worker" });
      if (this.ranks.every((r) => r.state === "left")) void this.end(why);
      return;
    }
    const how = exit.signal ? `was killed by ${exit.signal}` : `exited with code ${exit.code}`;
    const what = `worker for rank ${local.rank} on ${os.hostname()} ${how}`;
    if (local.state !== "restarting" && local.state !== "left") {
      this.mesh.leave(local.rank, what);
      this.groups.leave(local.rank, what);
      this.direct?.leave(local.rank, what);
      this.hostLog(what, "warn");
      this.send({ t: "failed", rank: local.rank, message: what, kind: "worker" });
    }
    if (local.restarts >= this.#maxRestarts) {
      const times = `${local.restarts + 1} time${local.restarts === 0 ? "" : "s"}`;
      const why = `${what}; it crashed ${times} (faults.max_restarts is ${this.#maxRestarts}), so it leaves the job`;
      this.hostLog(why, "error");
      local.on("left", `crashed ${times}`);
      this.send({ t: "failed", rank: local.rank, message: why, kind: "worker" });
      if (this.ranks.every((r) => r.state === "left" && r.restarts >= this.#maxRestarts)) void this.end(why);
      return;
    }
    local.restart();
    this.log(`restarting the worker for rank ${local.rank} (restart ${local.restarts} of ${this.#maxRestarts})`, "warn");
    this.#spawn(local);
  }

  /** Loaded: the coordinator hears `ready` once per worker start, and `ring_ready` once it is linked too. */
  #loaded(local: LocalRank, m: Extract<FromWorker, { op: "ready" }>) {
    if (local.state !== "spawning" && local.state !== "restarting") return this.fail(`rank ${local.rank} sent ready twice`, "internal", local.rank);
    const { op: _op, ...info } = m;
    local.info = info;
    local.on("loaded");
    this.send({ t: "ready", rank: local.rank, info, ...(local.worker ? { startup: local.startupFigures(local.worker) } : {}) });
    if (this.#fullyLinked(local.rank)) this.#enterRing(local, this.mesh.members.length);
  }

  /** Linked into the ring and every group it belongs to, in this epoch. */
  #fullyLinked(rank: number): boolean {
    return this.mesh.isLinked(rank) && this.groups.allLinked(rank) && (this.direct?.allLinked(rank) ?? true);
  }

  #linked(rank: number) {
    const local = this.#local(rank)!;
    if (local.loaded && this.#fullyLinked(rank)) this.#enterRing(local, this.mesh.members.length);
  }

  #enterRing(local: LocalRank, size: number) {
    local.on("linked");
    local.worker?.send({ op: "ring", size });
    this.send({ t: "ring_ready", rank: local.rank, epoch: this.mesh.epoch });
  }

  /**
   * Re-form the ring with `members` only (between rounds: no collective in flight). Local
   * ranks left out stop their workers; those (re)joining wait for a ring that names them.
   */
  #reform(epoch: number, members: number[], urls: { rank: number; url: string; key: string }[], groups: GroupSpec[]) {
    let leftOut: number[];
    try {
      leftOut = this.mesh.reform(epoch, members, urls);
      this.groups.reform(epoch, groups, urls);
      this.direct?.reform(epoch, members, urls);
    } catch (err) {
      return this.fail(errorMessage(err), "internal");
    }
    for (const local of this.ranks) {
      if (local.loaded) local.on("unlinked");
      if (!leftOut.includes(local.rank) || !local.loaded) continue;
      this.log(`rank ${local.rank} left out of the ring; stopping its worker`);
      local.on("left", "left out of the ring");
      void local.worker?.stop();
    }
  }

  /** This rank's ring broke: tell the coordinator once per epoch. The worker waits in its collective for the abort. */
  #ringLost(rank: number, epoch: number, reason: string) {
    const local = this.#local(rank);
    if (this.#ended || !local || local.gone || local.state === "restarting") return;
    this.hostLog(reason, "warn");
    this.send({ t: "ring_lost", rank, epoch, reason });
  }

  /** An abort decision: every local member's attempt ends, its collectives in flight and queued are dropped. */
  async #sendInParts(report: Extract<ToCoordinator, { t: "report" }>, payload: Uint8Array) {
    this.send({ ...report, payload_bytes: payload.byteLength });
    for (let at = 0; at < payload.byteLength; at += REPORT_PART_BYTES) {
      // The link takes a part before the next is encoded: the payload is never held twice.
      while (this.control.readyState === this.control.OPEN && this.control.bufferedAmount > REPORT_PART_BYTES) await new Promise((r) => setTimeout(r, 5));
      if (this.control.readyState !== this.control.OPEN || this.#ended) return;
      this.send({ t: "report_part", rank: report.rank, payload: payload.subarray(at, at + REPORT_PART_BYTES) });
    }
  }

  #abortAttempts(step: number) {
    this.#stats.aborted(step);
    this.mesh.abortRounds(`step ${step} abandoned`);
    this.groups.abortRounds(`step ${step} abandoned`);
    this.direct?.abortRounds(`step ${step} abandoned`);
    for (const r of this.ranks) {
      if (!this.mesh.inRing(r.rank)) continue;
      r.attempt += 1;
      r.liveFrom = r.attempt;
      r.queue = Promise.resolve();
    }
  }

  #workerError(local: LocalRank, m: Extract<FromWorker, { op: "error" }>) {
    if (m.kind === "config") {
      this.send({ t: "failed", rank: local.rank, message: cleanText(m.message, MAX_PEER_TEXT, { multiline: true }), field: m.field?.slice(0, 256), kind: "config" });
      void this.end(m.message);
    } else this.fail(m.message, m.kind === "task" ? "task" : "worker", local.rank, m.where);
  }

  end(reason: string): Promise<void> {
    this.ending ??= this.#finish(reason);
    return this.ending;
  }

  async #finish(reason: string) {
    this.#ended = true;
    clearTimeout(this.#deadline);
    this.#stopControlHeartbeat();
    this.#speed.stop();
    this.mesh.close(reason);
    this.groups.close(reason);
    this.direct?.close(reason);
    await Promise.all(this.ranks.map((r) => r.worker?.stop()));
    if (this.#dir) await rm(this.#dir, { recursive: true, force: true });
    for (const r of this.ranks) if (r.state !== "left") r.on("stopped");
    this.#stats.stop();
    this.onEnd(reason);
  }
}
