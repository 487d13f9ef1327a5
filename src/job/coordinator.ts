import { randomBytes, randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { configErrorAt, type LoadedConfig } from "../config/load.js";
import { UserError, errorMessage } from "../errors.js";
import type { ToCoordinator } from "../protocol/messages.js";
import { resolvePython } from "../runtime/python.js";
import { allocate } from "../schedule/allocate.js";
import { Rebalancer } from "../schedule/rebalance.js";
import { equalShares, slicesFor } from "../schedule/shares.js";
import type { Reporter, StatusLevel, WorkerRow } from "./events.js";
import { startLocalProviders } from "./localProviders.js";
import { ProviderClient, ringUrl } from "./providerClient.js";
import { RunDir, type Checkpoint, type StepMetrics } from "./runDir.js";

export interface TrainOptions {
  loaded: LoadedConfig;
  /** --local N: number of local providers, overriding config local_workers. */
  local?: number;
  python?: string;
  torchSpec?: string;
  reporter: Reporter;
  /** Aborted on Ctrl-C / SIGTERM. */
  signal?: AbortSignal;
  env?: NodeJS.ProcessEnv;
  /** Continue this run directory from its newest intact checkpoint. */
  resume?: string;
}

export interface TrainSummary {
  name: string;
  status: "completed" | "failed" | "cancelled";
  error?: string;
  steps: number;
  samples: number;
  wall_s: number;
  /** Seconds spent in steps (evaluation included; start-up, connecting and loading left out). */
  train_s: number;
  /** samples / train_s: the training throughput, which wall_s would understate on short runs. */
  samples_per_s: number | null;
  final_loss: number | null;
  eval: Record<string, number> | null;
  eval_step: number | null;
  bytes_sent: number;
  /** Of bytes_sent, the initial broadcast of rank 0's weights. */
  sync_bytes: number;
  /** What the steps' collectives would have sent as plain float32 all-reduces. */
  uncompressed_bytes: number;
  /** uncompressed_bytes / (bytes_sent - sync_bytes). */
  compression_ratio: number;
  compression: LoadedConfig["config"]["compression"];
  /** Steps whose update every worker skipped because of non-finite gradients. */
  steps_skipped: number[];
  /** Workers left out of the ring because they would have slowed every step, and why. */
  left_out: { rank: number; id: string; after_step: number; reason: string }[];
  /** Faults survived: when, what, who, and seconds from the fault to the next completed step. */
  /** wall_s: when the fault was first noticed, on the same clock as metrics.jsonl's wall_s. */
  faults: { step: number; wall_s: number; kind: Fault["kind"]; ranks: number[]; reason: string; recovery_s: number | null }[];
  /** Steps abandoned by a fault and run again (once per abandonment). */
  steps_redone: number[];
  /** Each provider's measured upload to its ring successor (none for a single host). */
  links: { rank: number; to: number; rtt_ms: number | null; upload_bytes_per_s: number | null }[];
  workers: { id: string; rank: number; provider: string; device: string; samples: number; share: number }[];
  run_dir: string;
  started_at: string;
}

/** How often replicas compare parameter hashes (and always on the last step). */
export const HASH_EVERY = 10;
/** Workers import torch and build the datasets before they are ready: allow for a slow first start. */
const READY_TIMEOUT_MS = 300_000;
const STEP_TIMEOUT_MS = 600_000;
/** Bytes each host uploads to its ring successor to measure the link. */
const LINK_PROBE_BYTES = 4 * 1024 * 1024;
const LINK_PROBE_TIMEOUT_MS = 180_000;
const RING_TIMEOUT_MS = 60_000;
/** Survivors answering an abort or commit during recovery. */
const RECOVERY_TIMEOUT_MS = 60_000;
/** How often providers that are away are tried again, and how long one try may take. */
const RECONNECT_INTERVAL_MS = 3_000;
const RECONNECT_TIMEOUT_MS = 5_000;
/** Recoveries interrupted by yet another fault before the job gives up. */
const MAX_RECOVERY_ATTEMPTS = 5;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
/** Steps measured before deciding whether a worker costs the job more than it adds. */
const LEAVE_OUT_AFTER_STEPS = 3;

function formatRate(bytesPerS: number): string {
  if (bytesPerS >= 1e9) return `${(bytesPerS / 1e9).toFixed(2)} GB/s`;
  if (bytesPerS >= 1e6) return `${(bytesPerS / 1e6).toFixed(1)} MB/s`;
  return `${(bytesPerS / 1e3).toFixed(0)} kB/s`;
}

type Kind = ToCoordinator["t"];
type MessageOf<K extends Kind> = Extract<ToCoordinator, { t: K }>;

interface Rank {
  rank: number;
  client: ProviderClient;
  device: string;
  row: WorkerRow;
  /** The worker's micro-batch cap as last reported (null: none; undefined: no report yet). */
  maxMicroBatch: number | null | undefined;
}

export class JobFailed extends UserError {}

/** Something a job survives: a provider lost, a worker dead, a ring cut. */
export interface Fault {
  kind: "provider lost" | "worker died" | "ring broken";
  /** Ranks gone with it (none for a ring cut between live members). */
  ranks: number[];
  reason: string;
  /** Date.now() when the coordinator learnt of it. */
  at: number;
}

class FaultError extends Error {
  constructor(readonly fault: Fault) {
    super(`${fault.kind}: ${fault.reason}`);
  }
}

/** Collects one message of a kind from every rank; any failure or lost provider rejects it. */
class Gather {
  private wait: {
    kind: Kind;
    match: (m: ToCoordinator) => boolean;
    got: Map<number, ToCoordinator>;
    from: number[];
    resolve: (m: Map<number, ToCoordinator>) => void;
    reject: (err: Error) => void;
    timer: NodeJS.Timeout;
  } | null = null;
  private failure: Error | null = null;

  constructor(private readonly ranks: () => number[]) {}


  expect<K extends Kind>(
    kind: K,
    what: string,
    timeoutMs: number,
    match: (m: MessageOf<K>) => boolean = () => true,
    from: number[] = this.ranks(),
  ): Promise<Map<number, MessageOf<K>>> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.interrupted) {
      const err = this.interrupted;
      this.interrupted = null;
      return Promise.reject(err);
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const missing = from.filter((r) => !this.wait?.got.has(r));
        this.wait = null;
        reject(new JobFailed(`Timed out after ${timeoutMs / 1000} s waiting for ${what} from rank(s) ${missing.join(", ")}`));
      }, timeoutMs);
      this.wait = {
        kind,
        match: match as (m: ToCoordinator) => boolean,
        got: new Map(),
        from,
        resolve: resolve as (m: Map<number, ToCoordinator>) => void,
        reject,
        timer,
      };
    });
  }

  deliver(message: ToCoordinator & { rank: number }) {
    const w = this.wait;
    if (!w || w.kind !== message.t || !w.from.includes(message.rank) || !w.match(message)) return;
    w.got.set(message.rank, message);
    if (w.got.size === w.from.length) {
      clearTimeout(w.timer);
      this.wait = null;
      w.resolve(w.got);
    }
  }

  /** A recoverable fault: reject the wait in progress (or the next one), without failing for good. */
  interrupt(err: Error) {
    const w = this.wait;
    if (!w) {
      this.interrupted = err;
      return;
    }
    this.wait = null;
    clearTimeout(w.timer);
    w.reject(err);
  }

  private interrupted: Error | null = null;

  clearInterrupt() {
    this.interrupted = null;
  }

  fail(err: Error) {
    if (this.failure) return;
    this.failure = err;
    const w = this.wait;
    this.wait = null;
    if (w) {
      clearTimeout(w.timer);
      w.reject(err);
    }
  }
}

function taskErrorHint(kind: string) {
  return kind === "task" ? "The error is in the task file: fix it and run `nimble train` again." : undefined;
}

/**
 * `nimble train`: find or start providers, ship the task, assign ranks and the ring, drive
 * the step loop, and write the run directory.
 */
export async function runTraining(opts: TrainOptions): Promise<{ runDir: string; summary: TrainSummary }> {
  const { loaded, reporter } = opts;
  const config = loaded.config;
  const env = opts.env ?? process.env;
  const status = (message: string, level: StatusLevel = "info") => reporter.handle({ type: "status", message, level });
  const cleanups: (() => Promise<void> | void)[] = [];
  const cleanup = async () => {
    for (const fn of cleanups.reverse()) await fn();
    cleanups.length = 0;
  };

  let runDir: RunDir | null = null;
  const ranks: Rank[] = [];
  /** Ranks in the ring now, in ring order: all of them until some are left out. */
  let active: Rank[] = [];
  let epoch = 0;
  const gather = new Gather(() => active.map((r) => r.rank));
  const leftOut: TrainSummary["left_out"] = [];
  /** Ranks whose workers are loaded and waiting to enter the ring (restarted, or joined). */
  const joiners = new Set<number>();
  const targetOf = new Map<ProviderClient, { address: string; token: string }>();
  const rows = () => ranks.map((r) => ({ ...r.row }));
  /** The providers of the job, and those hosting the ring's members now. */
  const allClients = () => [...new Set(ranks.map((r) => r.client))];
  const activeClients = () => [...new Set(active.map((r) => r.client))];
  const ringUrls = () => ranks.map((r) => ({ rank: r.rank, url: ringUrl(r.client.address) }));
  /** Re-form the ring (a new epoch) with the ranks in `active` as its members, once each is linked. */
  const reformRing = async (what: string) => {
    epoch += 1;
    const formed = gather.expect("ring_ready", what, RING_TIMEOUT_MS);
    for (const c of allClients()) c.send({ t: "ring", epoch, members: active.map((r) => r.rank), urls: ringUrls() });
    await formed;
  };
  const faultLog: TrainSummary["faults"] = [];
  const stepsRedone: number[] = [];
  /** Faults noticed and not yet recovered from. */
  let faultQueue: Fault[] = [];
  /** Set once the step loop runs: before it, any fault fails the job. */
  let training = false;
  let recovering = false;
  const heartbeatMs = config.faults.heartbeat_s * 1000;
  /** Ranks some fault already named since they last (re)joined: later news of them is no new fault. */
  const declaredLost = new Set<number>();
  /** A loss told again with more to it (a provider reports a crash, then that the worker gives up): keep the fuller reason. */
  const retell = (lostRanks: number[], reason: string) => {
    const known = [...faultLog, ...faultQueue].reverse().find((f) => f.ranks.some((r) => lostRanks.includes(r)));
    if (known && reason.startsWith(known.reason)) known.reason = reason;
  };
  const noteFault = (fault: Fault) => {
    if (fault.ranks.length > 0 && fault.ranks.every((r) => declaredLost.has(r))) return retell(fault.ranks, fault.reason);
    for (const r of fault.ranks) declaredLost.add(r);
    if (!training) {
      gather.fail(new JobFailed(`${fault.kind === "provider lost" ? "Lost provider" : fault.kind === "worker died" ? "A worker died" : "The ring broke"}: ${fault.reason}`));
      return;
    }
    faultQueue.push(fault);
    status(`Fault: ${fault.kind}: ${fault.reason}`, "warn");
    gather.interrupt(new FaultError(fault));
  };
  const links: TrainSummary["links"] = [];
  const started = Date.now();
  const startedAt = new Date().toISOString();
  let stepsDone = 0;
  let samplesDone = 0;
  /** Sum of the completed steps' step_s (resumed runs: the kept steps' too). */
  let trainSeconds = 0;
  let bytesSent = 0;
  let uncompressedBytes = 0;
  /** The initial weight broadcast: counted in bytes_sent, not in the compression ratio. */
  let syncBytes = 0;
  const stepsSkipped: number[] = [];
  let lastLoss: number | null = null;
  // Uncompressed / actual bytes on the wire; 1 when nothing travelled (one worker).
  const compressionRatio = () => (bytesSent - syncBytes > 0 ? uncompressedBytes / (bytesSent - syncBytes) : 1);
  let lastEval: Record<string, number> | null = null;
  let lastEvalStep: number | null = null;

  const summary = (status: TrainSummary["status"], error?: string): TrainSummary => ({
    name: config.name,
    status,
    ...(error ? { error } : {}),
    steps: stepsDone,
    samples: samplesDone,
    wall_s: (Date.now() - started) / 1000,
    train_s: trainSeconds,
    samples_per_s: trainSeconds > 0 ? samplesDone / trainSeconds : null,
    final_loss: lastLoss,
    eval: lastEval,
    eval_step: lastEvalStep,
    bytes_sent: bytesSent,
    sync_bytes: syncBytes,
    uncompressed_bytes: uncompressedBytes,
    compression_ratio: compressionRatio(),
    compression: config.compression,
    steps_skipped: stepsSkipped,
    left_out: leftOut,
    faults: faultLog,
    steps_redone: stepsRedone,
    links,
    workers: ranks.map((r) => ({
      id: r.row.id,
      rank: r.rank,
      provider: r.row.provider,
      device: r.device,
      samples: r.row.samples,
      share: samplesDone > 0 ? r.row.samples / samplesDone : 0,
    })),
    run_dir: runDir?.dir ?? "",
    started_at: startedAt,
  });

  /** Ctrl-C while training: stop after the step in flight, leaving a checkpoint to resume from. */
  let stopRequested = false;
  const onAbort = () => {
    if (training && !stopRequested) {
      stopRequested = true;
      status("Stopping after this step and writing a checkpoint (Ctrl-C again stops at once)", "warn");
      return;
    }
    gather.fail(new UserError("Training cancelled", "Checkpoints already written are kept in the run directory.", 130));
  };
  opts.signal?.addEventListener("abort", onAbort);
  if (opts.signal?.aborted) onAbort();

  try {
    // 1. Providers: the ones the config names, or local ones started here.
    let targets: { address: string; token: string; optional: boolean }[];
    if (config.providers.length > 0) {
      targets = config.providers.map((p, i) => {
        const token = p.token ?? env.NIMBLE_TOKEN;
        if (!token) {
          throw new UserError(
            `${loaded.path}: providers[${i}] (${p.address}) has no token`,
            "Add `token:` to the entry (the one `nimble provide` printed) or set NIMBLE_TOKEN.",
            2,
          );
        }
        return { address: p.address, token, optional: p.optional };
      });
    } else {
      const count = opts.local ?? config.local_workers;
      const python = await resolvePython({ python: opts.python, torchSpec: opts.torchSpec, env, onProgress: status });
      status(`Starting ${count} local provider${count === 1 ? "" : "s"} (python ${python.pythonVersion}, torch ${python.torchVersion})`);
      const threads = Math.max(1, Math.floor(os.cpus().length / count));
      const local = await startLocalProviders({
        count,
        python: python.python,
        threads,
        env,
        onLog: (source, line) => reporter.handle({ type: "log", source, line }),
      });
      cleanups.push(local.stop);
      targets = local.providers.map((p) => ({ address: p.address, token: p.token, optional: false }));
    }

    // 2. Connect and authenticate.
    status(`Connecting to ${targets.length} provider${targets.length === 1 ? "" : "s"}`);
    const settled = await Promise.allSettled(targets.map((t) => ProviderClient.connect(t.address, t.token)));
    const clients = settled.flatMap((s) => (s.status === "fulfilled" ? [s.value] : []));
    /** Providers to (re)connect to while training: optional ones not up yet, lost ones. */
    const absent = new Map<string, { address: string; token: string }>();
    settled.forEach((s, i) => {
      if (s.status === "fulfilled") targetOf.set(s.value, targets[i]);
      else if (targets[i].optional) {
        absent.set(targets[i].address, targets[i]);
        status(`Optional provider ${targets[i].address} is not reachable (${errorMessage(s.reason)}); it joins when it comes up`);
      }
    });
    for (const c of clients) c.watchHeartbeat(heartbeatMs);
    cleanups.push(() => clients.forEach((c) => c.close()));
    const refused = settled.find((s, i) => s.status === "rejected" && !targets[i].optional);
    if (refused) throw (refused as PromiseRejectedResult).reason;
    if (clients.length === 0) throw new UserError("None of the providers is reachable", "Start `nimble provide` on at least one of them.");

    // 3. Ranks, in provider order, one per device; the ring follows rank order.
    for (const client of clients) addRanks(client);
    active = [...ranks];
    reporter.handle({ type: "workers", workers: rows() });
    for (const client of clients) attach(client);

    function addRanks(client: ProviderClient): Rank[] {
      return client.info.devices.map((device, index) => {
        const rank = ranks.length;
        const r: Rank = {
          rank,
          client,
          device: device.id,
          maxMicroBatch: undefined,
          row: {
            id: `${client.address.replace(/^wss?:\/\//, "")}#${index}`,
            rank,
            provider: client.address,
            device: `${device.id} (${device.name})`,
            state: "starting",
            share: 0,
            samples: 0,
            compute_s: 0,
            comm_s: 0,
            idle_s: 0,
            bytes_sent: 0,
          },
        };
        ranks.push(r);
        return r;
      });
    }

    function attach(client: ProviderClient) {
      client.on("lost", (reason) => {
        const gone = active.filter((r) => r.client === client).map((r) => r.rank);
        client.close();
        for (const r of ranks) if (r.client === client) joiners.delete(r.rank);
        const target = targetOf.get(client);
        if (target && config.providers.length > 0) absent.set(target.address, target);
        if (gone.length > 0 || !training) noteFault({ kind: "provider lost", ranks: gone, reason: `${client.address}: ${reason}`, at: Date.now() });
      });
      client.on("message", (m) => {
        if (m.t === "log") reporter.handle({ type: "log", source: client.address, line: m.line, level: m.level === "error" ? "warn" : m.level });
        else if (m.t === "failed") {
          const who = m.rank !== undefined ? `rank ${m.rank} on provider ${client.address}` : `provider ${client.address}`;
          // A worker that found the config impossible for this model: report it like a load error.
          if (m.kind === "config" && m.field) gather.fail(configErrorAt(loaded, m.field, m.message));
          // A dead worker is a fault the job survives once training runs (its rank leaves).
          else if (m.kind === "worker" && m.rank !== undefined && training) {
            if (active.some((r) => r.rank === m.rank)) noteFault({ kind: "worker died", ranks: [m.rank], reason: m.message, at: Date.now() });
            else {
              // Out of the ring already (it crashed again while restarting, or gave up).
              joiners.delete(m.rank);
              if (ranks[m.rank]) ranks[m.rank].row.state = "lost";
              retell([m.rank], m.message);
              status(m.message, "warn");
            }
          } else gather.fail(new JobFailed(`${who} failed: ${m.where ? `${m.where}: ` : ""}${m.message}`, taskErrorHint(m.kind)));
        } else if (m.t === "ring_lost") {
          // Reports from a ring already given up (during recovery, or of an older epoch) say nothing new.
          if (m.epoch === epoch && !recovering) noteFault({ kind: "ring broken", ranks: [], reason: m.reason, at: Date.now() });
        } else if (m.t === "ready" && training && ranks[m.rank]?.client === client && !active.includes(ranks[m.rank])) {
          // A restarted worker, or a provider that (re)joined: brought in at the next step boundary.
          joiners.add(m.rank);
          ranks[m.rank].row.state = "joining";
          status(`Rank ${m.rank} on ${client.address} is ready to join`);
        } else if ("rank" in m) gather.deliver(m);
      });
    }

    // 4. Run directory and job spec.
    let resumeFrom: Checkpoint | null = null;
    if (opts.resume) {
      const { checkpoint, skipped } = await RunDir.latestCheckpoint(opts.resume);
      for (const why of skipped) status(`Passing over checkpoint ${why}`, "warn");
      if (!checkpoint) {
        throw new UserError(
          `${opts.resume} has no intact checkpoint to resume from${skipped.length ? ` (${skipped.join("; ")})` : ""}`,
          "Checkpoints are written every `checkpoint.every` steps; a run without one starts again with `nimble train CONFIG`.",
          2,
        );
      }
      resumeFrom = checkpoint;
      const { run: reopened, kept } = await RunDir.reopen(opts.resume, checkpoint.step);
      runDir = reopened;
      // The run's figures continue from the checkpoint: the steps after it are run again.
      stepsDone = checkpoint.step;
      for (const m of kept) {
        samplesDone += m.samples;
        trainSeconds += m.step_s;
        bytesSent += m.bytes_sent;
        uncompressedBytes += m.uncompressed_bytes;
        if (m.loss !== null) lastLoss = m.loss;
        if (m.skipped) stepsSkipped.push(m.step);
      }
      reporter.handle({ type: "run", run_dir: reopened.dir, resumed: true });
      status(`Resuming ${opts.resume} from step ${checkpoint.step} (${path.basename(checkpoint.dir)})`);
    } else {
      runDir = await RunDir.create(path.resolve(config.output), config.name);
      await runDir.copyInputs(loaded.path, loaded.taskPath);
      reporter.handle({ type: "run", run_dir: runDir.dir, resumed: false });
    }
    const run = runDir;
    const code = await readFile(loaded.taskPath);
    const job = randomUUID();
    const secret = randomBytes(24).toString("hex");
    const sendJob = (client: ProviderClient, join: boolean) =>
      client.send({
        t: "job",
        job,
        secret,
        task: { filename: path.basename(loaded.taskPath), code },
        config: config as unknown as Record<string, unknown>,
        world_size: ranks.length,
        ranks: ranks.filter((r) => r.client === client).map((r) => ({ rank: r.rank, device: r.device })),
        ring: ringUrls(),
        ...(join ? { join: true } : {}),
      });
    const ready = gather.expect("ready", "worker start", READY_TIMEOUT_MS);
    status(`Starting ${ranks.length} worker${ranks.length === 1 ? "" : "s"}; run directory ${run.dir}`);
    for (const client of clients) sendJob(client, false);
    cleanups.push(() => clients.forEach((c) => c.send({ t: "cancel", reason: "job over" })));

    // Providers that are optional and not up yet, or lost, are tried again while training
    // runs; one that answers gets the job as a joiner (its old ranks, when its devices match).
    const connecting = new Set<string>();
    const reconnect = setInterval(() => {
      if (!training) return;
      for (const target of absent.values()) {
        if (connecting.has(target.address)) continue;
        connecting.add(target.address);
        ProviderClient.connect(target.address, target.token, RECONNECT_TIMEOUT_MS).then(
          (client) => {
            connecting.delete(target.address);
            if (!training) return client.close();
            absent.delete(target.address);
            targetOf.set(client, target);
            clients.push(client);
            client.watchHeartbeat(heartbeatMs);
            attach(client);
            const old = ranks.filter((r) => r.row.provider === client.address && !active.includes(r));
            if (old.length === client.info.devices.length) {
              for (const r of old) Object.assign(r, { client, maxMicroBatch: undefined });
              for (const r of old) r.row.state = "starting";
            } else addRanks(client);
            status(`Provider ${client.address} is back: starting its worker${client.info.devices.length === 1 ? "" : "s"} to join`);
            reporter.handle({ type: "workers", workers: rows() });
            sendJob(client, true);
          },
          () => connecting.delete(target.address),
        );
      }
    }, RECONNECT_INTERVAL_MS);
    cleanups.push(() => clearInterval(reconnect));
    const readyInfo = await ready;
    const info = readyInfo.get(0)!.info;
    status(`Workers ready: ${info.model}; ${info.train_size} training and ${info.val_size} validation samples`);

    // 5. Resuming: every rank loads the checkpoint (its own compressor memories where saved).
    if (resumeFrom) {
      const shared = resumeFrom.files.filter((f) => !/^compressor-rank-\d+\.pt$/.test(f.name));
      const loadedAll = gather.expect("loaded", "checkpoint loading", STEP_TIMEOUT_MS);
      for (const r of ranks) {
        const own = resumeFrom.files.find((f) => f.name === `compressor-rank-${r.rank}.pt`);
        const files = own ? [...shared.filter((f) => f.name !== "compressor.pt"), { name: "compressor.pt", data: own.data }] : shared;
        r.client.send({ t: "load_state", rank: r.rank, files });
      }
      for (const [rank, m] of await loadedAll) {
        if (m.step !== resumeFrom.step) throw new JobFailed(`Rank ${rank} loaded step ${m.step} from a checkpoint of step ${resumeFrom.step}`);
      }
    }

    // Every replica starts from rank 0's weights.
    const synced = gather.expect("synced", "initial weight sync", STEP_TIMEOUT_MS);
    clients.forEach((c) => c.send({ t: "sync", source: 0 }));
    const syncReports = await synced;
    checkHashes(syncReports, "after the initial weight sync");
    // The initial broadcast is an all-reduce too: it counts in the run's bytes, not a step's.
    syncBytes = [...syncReports.values()].reduce((sum, m) => sum + m.bytes_sent, 0);
    bytesSent += syncBytes;
    for (const r of ranks) r.row.state = "training";

    // Leaving out slow workers weighs each one's link: measure each host's upload to the next.
    const mayLeaveOut = config.balance === "measured" && config.leave_out_slow && clients.length > 1;
    if (mayLeaveOut) {
      const probed = gather.expect("link", "link measurements", LINK_PROBE_TIMEOUT_MS);
      clients.forEach((c) => c.send({ t: "probe_links", bytes: LINK_PROBE_BYTES }));
      for (const [rank, m] of await probed) links.push({ rank, to: m.to, rtt_ms: m.rtt_ms, upload_bytes_per_s: m.upload_bytes_per_s });
      links.sort((a, b) => a.rank - b.rank);
      const between = links.filter((l) => l.upload_bytes_per_s !== null);
      if (between.length > 0) {
        status(`Links: ${between.map((l) => `rank ${l.rank} -> ${l.to} ${formatRate(l.upload_bytes_per_s!)}, rtt ${l.rtt_ms!.toFixed(1)} ms`).join("; ")}`);
      }
    }

    // 6. The step loop.
    const batch = config.batch_size;
    // Shares follow each worker's measured speed (profiles first, then every step's compute
    // times), so that all finish their compute together; `balance: equal` splits evenly.
    const profileRates = ranks.map((r) => r.client.info.profile?.matmul_gflops_fp32 ?? 0);
    const initialRates = profileRates.every((x) => x > 0) ? profileRates : ranks.map(() => 1);
    let rebalancer = config.balance === "measured" ? new Rebalancer(batch, initialRates) : null;
    /** Shares of the active ranks, in their order. */
    let shares = rebalancer ? rebalancer.shares : equalShares(batch, ranks.length);
    /** Shares indexed by rank (0 for ranks left out), as workers take them. */
    const byRank = (part: number[]) => {
      const all = new Array<number>(ranks.length).fill(0);
      active.forEach((r, k) => (all[r.rank] = part[k]));
      return all;
    };
    // Compressed steps are the ones to weigh links against: decide once they are measured.
    const compressedFrom = config.compression.method === "powersgd" || config.compression.method === "topk" ? config.compression.start_step : 0;
    const leaveOutAfter = Math.max(LEAVE_OUT_AFTER_STEPS, compressedFrom + 2) - 1;
    const recent: { samples: number; seconds: number }[] = [];
    /** After a recovery: compare replicas at the next step. */
    let verifyNext = false;
    /** Faults whose recovery time (to the next completed step) is still open. */
    let unrecovered: { entry: TrainSummary["faults"][number]; at: number }[] = [];

    /**
     * Survive the faults noticed so far: name who is lost, abandon the step in flight on every
     * survivor (or, between steps, commit the last one, which every member had reduced), re-form
     * the ring without the lost ranks and split the batch among the rest. Retried when another
     * fault strikes meanwhile; fails the job when fewer than faults.min_workers are left.
     */
    const recover = async (step: number | null): Promise<void> => {
      for (let attempt = 1; ; attempt++) {
        recovering = true;
        try {
          // Let faults that happen together surface (a killed host drops its control and ring
          // links at once). A ring cut with nobody known lost: wait out one heartbeat for a loss.
          await sleep(300);
          const deadline = Date.now() + heartbeatMs + 2000;
          while (faultQueue.length > 0 && faultQueue.every((f) => f.ranks.length === 0) && Date.now() < deadline) await sleep(100);
          const faults = faultQueue;
          faultQueue = [];
          // Faults noted while settling are handled here: they need not interrupt this recovery.
          gather.clearInterrupt();
          const lost = new Set(faults.flatMap((f) => f.ranks));
          // A lost member also breaks its neighbours' links: those reports are its echo, not
          // faults of their own. Recovery time counts from the first sign of trouble.
          const losses = faults.filter((f) => f.ranks.length > 0);
          const firstAt = Math.min(...faults.map((f) => f.at));
          for (const f of losses.length > 0 ? losses : faults.slice(0, 1)) {
            const entry = { step: step ?? stepsDone, wall_s: (firstAt - started) / 1000, kind: f.kind, ranks: f.ranks, reason: f.reason, recovery_s: null };
            faultLog.push(entry);
            unrecovered.push({ entry, at: firstAt });
          }
          for (const r of active) if (lost.has(r.rank)) r.row.state = "lost";
          const stay = active.filter((r) => !lost.has(r.rank));
          const minWorkers = config.faults.min_workers;
          const describeFaults = faults.map((f) => `${f.kind} (${f.reason})`).join("; ");
          if (stay.length === 0) {
            throw new JobFailed(`No worker left after ${describeFaults}: none holds the training state`, "Continue from the last checkpoint with `nimble train --resume RUN_DIR`.");
          }
          const rates = rebalancer?.rates;
          const stayRates = rates ? active.flatMap((r, k) => (lost.has(r.rank) ? [] : [rates[k]])) : null;
          active = stay;
          const liveClients = activeClients();
          if (step !== null) {
            const acks = gather.expect("step_aborted", `workers abandoning step ${step}`, RECOVERY_TIMEOUT_MS);
            for (const c of liveClients) c.send({ t: "abort", step });
            await acks;
          } else {
            const acks = gather.expect("committed", "workers applying the last step", RECOVERY_TIMEOUT_MS);
            for (const c of liveClients) c.send({ t: "commit" });
            checkHashes(await acks, "after a fault between steps");
          }
          await reformRing(`the ring re-forming without rank(s) ${[...lost].join(", ") || "(none)"}`);
          if (step !== null) stepsRedone.push(step);
          rebalancer = rebalancer && stayRates ? new Rebalancer(batch, stayRates) : rebalancer;
          shares = rebalancer ? rebalancer.shares : equalShares(batch, active.length);
          verifyNext = true;
          recovering = false;
          if (active.length < minWorkers) {
            // Too few to go on: wait for providers to come back (or restarted workers) and
            // bring them in before the step runs again.
            status(`Waiting up to ${config.faults.wait_s} s for providers: ${active.length} worker${active.length === 1 ? "" : "s"} left, faults.min_workers is ${minWorkers}`, "warn");
            const deadline = Date.now() + config.faults.wait_s * 1000;
            while (active.length + joiners.size < minWorkers) {
              if (Date.now() > deadline) {
                throw new JobFailed(
                  `${active.length} worker${active.length === 1 ? "" : "s"} left after ${describeFaults}, and no provider came back within ${config.faults.wait_s} s; faults.min_workers is ${minWorkers}`,
                  "Start more providers and run `nimble train --resume RUN_DIR`, or lower faults.min_workers.",
                );
              }
              await sleep(250);
            }
            await admit(step ?? stepsDone);
          }
          status(
            `Ring re-formed with ${active.length} worker${active.length === 1 ? "" : "s"} (ranks ${active.map((r) => r.rank).join(", ")})` +
              (step !== null ? `; redoing step ${step} with shares ${shares.join(" : ")}` : ""),
          );
          reporter.handle({ type: "workers", workers: rows() });
          return;
        } catch (err) {
          recovering = false;
          if (!(err instanceof FaultError)) throw err;
          if (attempt >= MAX_RECOVERY_ATTEMPTS) throw new JobFailed(`Could not recover after ${attempt} attempts: ${err.message}`);
        }
      }
    };
    /**
     * Bring ranks that are loaded and waiting (restarted workers, providers that came back or
     * joined) into the ring before `step`: the ring re-forms with them, every member takes one
     * current member's whole training state over the ring, and the batch is split anew.
     */
    const admit = async (step: number): Promise<void> => {
      const newcomers = [...joiners].map((rank) => ranks[rank]).filter((r) => !active.includes(r));
      joiners.clear();
      if (newcomers.length === 0) return;
      const source = active[0].rank;
      const rates = rebalancer?.rates;
      const rateOf = new Map(active.map((r, k) => [r.rank, rates ? rates[k] : 1]));
      const meanRate = [...rateOf.values()].reduce((a, b) => a + b, 0) / Math.max(1, rateOf.size);
      active = [...active, ...newcomers].sort((a, b) => a.rank - b.rank);
      await reformRing(`the ring re-forming with rank(s) ${newcomers.map((r) => r.rank).join(", ")}`);
      const synced = gather.expect("synced_state", `rank ${source}'s state reaching the new members`, STEP_TIMEOUT_MS);
      for (const c of activeClients()) c.send({ t: "sync_state", source });
      const got = await synced;
      checkHashes(got, `after rank(s) ${newcomers.map((r) => r.rank).join(", ")} took rank ${source}'s state`);
      for (const [rank, m] of got) {
        if (m.step !== step) throw new JobFailed(`Rank ${rank} is at step ${m.step} after taking rank ${source}'s state, not ${step}`);
      }
      for (const r of newcomers) {
        r.row.state = "training";
        declaredLost.delete(r.rank);
      }
      // Newcomers start at the others' mean speed; the next steps measure them.
      if (rebalancer) rebalancer = new Rebalancer(batch, active.map((r) => rateOf.get(r.rank) ?? meanRate));
      shares = rebalancer ? rebalancer.shares : equalShares(batch, active.length);
      status(`Rank${newcomers.length === 1 ? "" : "s"} ${newcomers.map((r) => r.rank).join(", ")} joined before step ${step} with rank ${source}'s state; ${active.length} workers, shares ${shares.join(" : ")}`);
      reporter.handle({ type: "workers", workers: rows() });
    };

    /** Run a collective phase between steps (evaluation, checkpoint), again after any fault. */
    const surviving = async <T>(phase: () => Promise<T>): Promise<T> => {
      for (;;) {
        try {
          return await phase();
        } catch (err) {
          if (!(err instanceof FaultError)) throw err;
          await recover(null);
        }
      }
    };

    training = true;
    for (let step = resumeFrom?.step ?? 0; step < config.steps; step++) {
      if (joiners.size > 0) await surviving(() => admit(step));
      const stepStart = Date.now();
      const wantHash = (step + 1) % HASH_EVERY === 0 || step === config.steps - 1 || verifyNext;
      let reports: Map<number, MessageOf<"step_done">>;
      try {
        const done = gather.expect("step_done", `step ${step}`, STEP_TIMEOUT_MS, (m) => m.step === step);
        const stepShares = byRank(shares);
        for (const c of activeClients()) c.send({ t: "step", step, shares: stepShares, want_hash: wantHash });
        reports = await done;
      } catch (err) {
        if (!(err instanceof FaultError)) throw err;
        await recover(step);
        step -= 1; // run it again on the re-formed ring
        continue;
      }
      verifyNext = false;
      // Hashes are taken before the step's update (which waits for the next message).
      if (wantHash) checkHashes(reports, `before step ${step}`);
      for (const u of unrecovered) u.entry.recovery_s = (Date.now() - u.at) / 1000;
      unrecovered = [];

      let loss = 0;
      let stepBytes = 0;
      let stepUncompressed = 0;
      let lr = 0;
      const skipped = reports.get(active[0].rank)!.skipped;
      // A worker idles while the slowest one computes: the ring waits for every member.
      const maxCompute = Math.max(...[...reports.values()].map((rep) => rep.compute_s));
      const nonfinite: string[] = [];
      for (const r of active) {
        const rep = reports.get(r.rank)!;
        if (rep.skipped !== skipped) {
          throw new JobFailed(`Replicas disagree about skipping step ${step}: rank ${active[0].rank} ${skipped ? "skipped" : "applied"} it, rank ${r.rank} did not`);
        }
        for (const name of rep.nonfinite ?? []) nonfinite.push(`${name} (rank ${r.rank})`);
        if (rep.max_micro_batch !== r.maxMicroBatch) {
          // The first report gives the provider's configured cap; a lower one later means memory ran out.
          if (r.maxMicroBatch !== undefined && rep.max_micro_batch !== null && (r.maxMicroBatch === null || rep.max_micro_batch < r.maxMicroBatch)) {
            status(`Rank ${r.rank} (${r.row.device}) ran out of device memory at step ${step}: it now accumulates micro-batches of at most ${rep.max_micro_batch} samples`, "warn");
          }
          r.maxMicroBatch = rep.max_micro_batch;
        }
        loss += (rep.loss * rep.samples) / batch;
        stepBytes += rep.bytes_sent;
        stepUncompressed += rep.uncompressed_bytes;
        lr = rep.lr;
        Object.assign(r.row, {
          share: rep.samples,
          samples: r.row.samples + rep.samples,
          compute_s: rep.compute_s,
          comm_s: rep.comm_s,
          idle_s: maxCompute - rep.compute_s,
          bytes_sent: r.row.bytes_sent + rep.bytes_sent,
        });
      }
      if (rebalancer) {
        const before = shares.join(":");
        shares = rebalancer.observe(
          active.map((r) => reports.get(r.rank)!.samples),
          active.map((r) => reports.get(r.rank)!.forward_backward_s ?? reports.get(r.rank)!.compute_s),
        );
        if (shares.join(":") !== before) status(`Step ${step + 1}: shares ${shares.join(" : ")} (measured samples/s ${rebalancer.rates.map((x) => x.toFixed(0)).join(" : ")})`, "debug");
      }
      stepsDone = step + 1;
      samplesDone += batch;
      bytesSent += stepBytes;
      uncompressedBytes += stepUncompressed;
      if (skipped) {
        stepsSkipped.push(step);
        status(`Step ${step} skipped on every worker: non-finite ${nonfinite.length ? nonfinite.join(", ") : "values in the reduced gradient"}`, "warn");
      } else lastLoss = loss;

      const isLast = step === config.steps - 1;
      let evalMetrics: Record<string, number> | undefined;
      let evalSeconds: number | undefined;
      if ((config.eval.every > 0 && (step + 1) % config.eval.every === 0) || isLast) {
        const evalStart = Date.now();
        evalMetrics = await surviving(() => evaluate(step, Math.min(config.eval.samples, info.val_size)));
        evalSeconds = (Date.now() - evalStart) / 1000;
        lastEval = evalMetrics;
        lastEvalStep = step;
      }
      const now = Date.now();
      const stepSeconds = (now - stepStart) / 1000;
      trainSeconds += stepSeconds;
      recent.push({ samples: batch, seconds: stepSeconds });
      if (recent.length > 20) recent.shift();
      const rate = recent.reduce((a, b) => a + b.samples, 0) / Math.max(1e-9, recent.reduce((a, b) => a + b.seconds, 0));
      const metrics: StepMetrics = {
        step,
        loss: skipped ? null : loss,
        lr,
        samples: batch,
        wall_s: (now - started) / 1000,
        step_s: stepSeconds,
        bytes_sent: stepBytes,
        uncompressed_bytes: stepUncompressed,
        ...(skipped ? { skipped: true, nonfinite } : {}),
        ...(evalMetrics ? { eval: evalMetrics, eval_s: evalSeconds } : {}),
        workers: active.map((r) => {
          const rep = reports.get(r.rank)!;
          return {
            rank: r.rank,
            samples: rep.samples,
            share: rep.samples,
            compute_s: rep.compute_s,
            forward_backward_s: rep.forward_backward_s ?? null,
            comm_s: rep.comm_s,
            idle_s: maxCompute - rep.compute_s,
            bytes_sent: rep.bytes_sent,
            uncompressed_bytes: rep.uncompressed_bytes,
            micro_batches: rep.micro_batches,
            max_micro_batch: rep.max_micro_batch,
          };
        }),
      };
      run.appendMetrics(metrics);
      reporter.handle({
        type: "step",
        step: step + 1,
        steps: config.steps,
        loss: lastLoss ?? loss,
        lr,
        samples: samplesDone,
        samples_per_s: rate,
        wall_s: metrics.wall_s,
        bytes_sent: bytesSent,
        compression_ratio: compressionRatio(),
        workers: rows(),
      });
      if (evalMetrics) reporter.handle({ type: "eval", step: step + 1, metrics: evalMetrics });
      if (rebalancer && mayLeaveOut && step === leaveOutAfter && active.length > 1 && step < config.steps - 1) {
        const current = rebalancer;
        const stepBytes = Math.max(...active.map((r) => reports.get(r.rank)!.bytes_sent));
        rebalancer = (await surviving(() => leaveOutSlow(step, current, stepBytes))) ?? rebalancer;
        shares = rebalancer.shares;
      }
      const stopping = stopRequested && step < config.steps - 1;
      if ((config.checkpoint.every > 0 && (step + 1) % config.checkpoint.every === 0) || stopping) {
        // One rank's model, optimizer, schedule, data position and RNG (the same on every
        // replica), and every rank's compressor state (error-feedback memories are per worker).
        const files = await surviving(async () => {
          const source = active[0].rank;
          const state = gather.expect("state", `checkpoint at step ${step + 1}`, STEP_TIMEOUT_MS, (m) => m.kind === "checkpoint" || m.kind === "compressor");
          for (const r of active) r.client.send({ t: "state", rank: r.rank, kind: r.rank === source ? "checkpoint" : "compressor" });
          const got = await state;
          const out = got.get(source)!.files.filter((f) => f.name !== "compressor.pt");
          for (const r of active) {
            const own = got.get(r.rank)!.files.find((f) => f.name === "compressor.pt");
            if (own) out.push({ name: `compressor-rank-${r.rank}.pt`, data: own.data });
          }
          // A single compressor.pt too, for tools that read one (it is the first rank's).
          const first = got.get(source)!.files.find((f) => f.name === "compressor.pt");
          if (first) out.push(first);
          return out;
        });
        const where = await run.writeCheckpoint(step + 1, files, config.checkpoint.keep);
        reporter.handle({ type: "checkpoint", step: step + 1, path: where });
      }
      if (stopping) {
        throw new UserError(
          `Training cancelled after step ${step + 1} of ${config.steps}`,
          `A checkpoint of step ${step + 1} is in ${run.dir}; continue with \`nimble train --resume ${run.dir}\`.`,
          130,
        );
      }
    }

    // 7. Final weights and summary: every replica applies the last step and compares hashes.
    const finalFiles = await surviving(async () => {
      const committed = gather.expect("committed", "the last step's update", STEP_TIMEOUT_MS);
      for (const c of activeClients()) c.send({ t: "commit" });
      checkHashes(await committed, "after the last step");
      const final = gather.expect("state", "final weights", STEP_TIMEOUT_MS, (m) => m.kind === "final", [active[0].rank]);
      active[0].client.send({ t: "state", rank: active[0].rank, kind: "final" });
      return (await stateFrom(final)).files;
    });
    training = false;
    for (const f of finalFiles) await run.writeFile(f.name, f.data);
    for (const r of active) r.row.state = "done";
    const result = summary("completed");
    await run.writeSummary(result as unknown as Record<string, unknown>);
    await run.close();
    reporter.handle({ type: "workers", workers: rows() });
    reporter.handle({ type: "done", run_dir: run.dir, summary: result as unknown as Record<string, unknown> });
    return { runDir: run.dir, summary: result };
  } catch (err) {
    const cancelled = err instanceof UserError && err.exitCode === 130;
    for (const r of active) if (r.row.state !== "done") r.row.state = "failed";
    gather.fail(err instanceof Error ? err : new Error(String(err)));
    if (runDir) {
      await runDir.writeSummary(summary(cancelled ? "cancelled" : "failed", errorMessage(err)) as unknown as Record<string, unknown>).catch(() => {});
      await runDir.close().catch(() => {});
      if (err instanceof UserError && !cancelled && !(err.hint ?? "").includes(runDir.dir)) {
        const hint = [err.hint, `Metrics and checkpoints so far are in ${runDir.dir}.`].filter(Boolean).join(" ");
        throw new JobFailed(err.message, hint, err.exitCode);
      }
    }
    throw err;
  } finally {
    opts.signal?.removeEventListener("abort", onAbort);
    await cleanup();
  }

  async function evaluate(step: number, samples: number): Promise<Record<string, number>> {
    const slices = slicesFor(samples, active.map(() => 1));
    const done = gather.expect("eval_done", `evaluation after step ${step + 1}`, STEP_TIMEOUT_MS, (m) => m.step === step);
    for (const client of activeClients()) {
      client.send({
        t: "eval",
        step,
        batch_size: config.eval.batch_size,
        slices: active.flatMap((r, k) => (r.client === client ? [{ rank: r.rank, ...slices[k] }] : [])),
      });
    }
    const results = await done;
    const totals: Record<string, number> = {};
    let count = 0;
    for (const rep of results.values()) {
      count += rep.count;
      for (const [k, v] of Object.entries(rep.sums)) totals[k] = (totals[k] ?? 0) + v;
    }
    return Object.fromEntries(Object.entries(totals).map(([k, v]) => [k, v / Math.max(1, count)]));
  }

  function checkHashes(reports: Map<number, { hash?: string }>, when: string) {
    const hashes = active.map((r) => reports.get(r.rank)?.hash);
    const first = hashes[0];
    const differing = hashes.filter((h) => h !== first);
    if (!first || differing.length > 0) {
      const list = active.map((r, k) => `rank ${r.rank} ${hashes[k]?.slice(0, 12) ?? "(none)"}`).join(", ");
      throw new JobFailed(`Replicas diverged ${when}: parameter hashes ${list}`, "This is a bug in nimble or a nondeterministic task; please report it with the run directory.");
    }
  }

  async function stateFrom(p: Promise<Map<number, MessageOf<"state">>>): Promise<MessageOf<"state">> {
    return [...(await p).values()][0];
  }

  /**
   * Weigh each active worker's measured speed and link against what it adds; leave out those
   * that make every step slower, re-form the ring without them, and return a rebalancer for
   * the rest (null when everyone stays).
   */
  async function leaveOutSlow(step: number, current: Rebalancer, stepBytesPerWorker: number): Promise<Rebalancer | null> {
    const rates = current.rates;
    const decision = allocate({
      batchSize: config.batch_size,
      stepBytesPerWorker,
      workers: active.map((r, k) => ({
        id: `rank ${r.rank} (${r.row.id})`,
        samplesPerS: rates[k],
        linkBytesPerS: links.find((l) => l.rank === r.rank)?.upload_bytes_per_s ?? undefined,
      })),
    });
    if (decision.excluded.length === 0) return null;
    const out = new Set(decision.excluded.map((e) => e.index));
    for (const e of decision.excluded) {
      const r = active[e.index];
      r.row.state = "left out";
      r.row.share = 0;
      leftOut.push({ rank: r.rank, id: r.row.id, after_step: step, reason: e.reason });
      status(`Leaving out ${e.reason}`, "warn");
    }
    const stay = active.filter((_, k) => !out.has(k));
    const stayRates = rates.filter((_, k) => !out.has(k));
    active = stay;
    await reformRing(`the ring re-formed without rank(s) ${[...out].join(", ")}`);
    reporter.handle({ type: "workers", workers: rows() });
    return new Rebalancer(config.batch_size, stayRates);
  }
}
