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
import type { Reporter, WorkerRow } from "./events.js";
import { startLocalProviders } from "./localProviders.js";
import { ProviderClient, ringUrl } from "./providerClient.js";
import { RunDir, type StepMetrics } from "./runDir.js";

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
}

export interface TrainSummary {
  name: string;
  status: "completed" | "failed" | "cancelled";
  error?: string;
  steps: number;
  samples: number;
  wall_s: number;
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
  const status = (message: string) => reporter.handle({ type: "status", message });
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
  const links: TrainSummary["links"] = [];
  const started = Date.now();
  const startedAt = new Date().toISOString();
  let stepsDone = 0;
  let samplesDone = 0;
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

  const onAbort = () => gather.fail(new UserError("Training cancelled", "Checkpoints already written are kept in the run directory.", 130));
  opts.signal?.addEventListener("abort", onAbort);
  if (opts.signal?.aborted) onAbort();

  try {
    // 1. Providers: the ones the config names, or local ones started here.
    let targets: { address: string; token: string }[];
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
        return { address: p.address, token };
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
      targets = local.providers.map((p) => ({ address: p.address, token: p.token }));
    }

    // 2. Connect and authenticate.
    status(`Connecting to ${targets.length} provider${targets.length === 1 ? "" : "s"}`);
    const settled = await Promise.allSettled(targets.map((t) => ProviderClient.connect(t.address, t.token)));
    const clients = settled.flatMap((s) => (s.status === "fulfilled" ? [s.value] : []));
    cleanups.push(() => clients.forEach((c) => c.close()));
    const refused = settled.find((s) => s.status === "rejected");
    if (refused) throw (refused as PromiseRejectedResult).reason;

    // 3. Ranks, in provider order, one per device; the ring follows rank order.
    for (const client of clients) {
      client.info.devices.forEach((device, index) => {
        const rank = ranks.length;
        ranks.push({
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
        });
      });
    }
    active = [...ranks];
    const rows = () => ranks.map((r) => ({ ...r.row }));
    reporter.handle({ type: "workers", workers: rows() });
    for (const client of clients) {
      client.on("lost", (reason) => gather.fail(new JobFailed(`Lost provider ${client.address}: ${reason}`)));
      client.on("message", (m) => {
        if (m.t === "log") reporter.handle({ type: "log", source: client.address, line: m.line });
        else if (m.t === "failed") {
          const who = m.rank !== undefined ? `rank ${m.rank} on provider ${client.address}` : `provider ${client.address}`;
          // A worker that found the config impossible for this model: report it like a load error.
          if (m.kind === "config" && m.field) gather.fail(configErrorAt(loaded, m.field, m.message));
          else gather.fail(new JobFailed(`${who} failed: ${m.where ? `${m.where}: ` : ""}${m.message}`, taskErrorHint(m.kind)));
        } else if ("rank" in m) gather.deliver(m);
      });
    }

    // 4. Run directory and job spec.
    runDir = await RunDir.create(path.resolve(config.output), config.name);
    const run = runDir;
    await run.copyInputs(loaded.path, loaded.taskPath);
    const code = await readFile(loaded.taskPath);
    const job = randomUUID();
    const secret = randomBytes(24).toString("hex");
    const ring = ranks.map((r) => ({ rank: r.rank, url: ringUrl(r.client.address) }));
    const ready = gather.expect("ready", "worker start", READY_TIMEOUT_MS);
    status(`Starting ${ranks.length} worker${ranks.length === 1 ? "" : "s"}; run directory ${run.dir}`);
    for (const client of clients) {
      client.send({
        t: "job",
        job,
        secret,
        task: { filename: path.basename(loaded.taskPath), code },
        config: config as unknown as Record<string, unknown>,
        world_size: ranks.length,
        ranks: ranks.filter((r) => r.client === client).map((r) => ({ rank: r.rank, device: r.device })),
        ring,
      });
    }
    cleanups.push(() => clients.forEach((c) => c.send({ t: "cancel", reason: "job over" })));
    const readyInfo = await ready;
    const info = readyInfo.get(0)!.info;
    status(`Workers ready: ${info.model}; ${info.train_size} training and ${info.val_size} validation samples`);

    // 5. Every replica starts from rank 0's weights.
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
    for (let step = 0; step < config.steps; step++) {
      const stepStart = Date.now();
      const wantHash = (step + 1) % HASH_EVERY === 0 || step === config.steps - 1;
      const done = gather.expect("step_done", `step ${step}`, STEP_TIMEOUT_MS, (m) => m.step === step);
      const stepShares = byRank(shares);
      for (const c of new Set(active.map((r) => r.client))) c.send({ t: "step", step, shares: stepShares, want_hash: wantHash });
      const reports = await done;
      if (wantHash) checkHashes(reports, `after step ${step}`);

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
            status(`Rank ${r.rank} (${r.row.device}) ran out of device memory at step ${step}: it now accumulates micro-batches of at most ${rep.max_micro_batch} samples`);
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
          active.map((r) => reports.get(r.rank)!.compute_s),
        );
        if (shares.join(":") !== before) status(`Step ${step + 1}: shares ${shares.join(" : ")} (measured samples/s ${rebalancer.rates.map((x) => x.toFixed(0)).join(" : ")})`);
      }
      stepsDone = step + 1;
      samplesDone += batch;
      bytesSent += stepBytes;
      uncompressedBytes += stepUncompressed;
      if (skipped) {
        stepsSkipped.push(step);
        status(`Step ${step} skipped on every worker: non-finite ${nonfinite.length ? nonfinite.join(", ") : "values in the reduced gradient"}`);
      } else lastLoss = loss;

      const isLast = step === config.steps - 1;
      let evalMetrics: Record<string, number> | undefined;
      if ((config.eval.every > 0 && (step + 1) % config.eval.every === 0) || isLast) {
        evalMetrics = await evaluate(step, Math.min(config.eval.samples, info.val_size));
        lastEval = evalMetrics;
        lastEvalStep = step;
      }
      const now = Date.now();
      const stepSeconds = (now - stepStart) / 1000;
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
        ...(evalMetrics ? { eval: evalMetrics } : {}),
        workers: active.map((r) => {
          const rep = reports.get(r.rank)!;
          return {
            rank: r.rank,
            samples: rep.samples,
            share: rep.samples,
            compute_s: rep.compute_s,
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
        rebalancer = await leaveOutSlow(step, rebalancer, Math.max(...active.map((r) => reports.get(r.rank)!.bytes_sent))) ?? rebalancer;
        shares = rebalancer.shares;
      }
      if (config.checkpoint.every > 0 && (step + 1) % config.checkpoint.every === 0) {
        const source = active[0].rank;
        const state = gather.expect("state", `checkpoint at step ${step + 1}`, STEP_TIMEOUT_MS, (m) => m.kind === "checkpoint", [source]);
        active[0].client.send({ t: "state", rank: source, kind: "checkpoint" });
        const files = (await stateFrom(state)).files;
        const where = await run.writeCheckpoint(step + 1, files, config.checkpoint.keep);
        reporter.handle({ type: "checkpoint", step: step + 1, path: where });
      }
    }

    // 7. Final weights and summary.
    const final = gather.expect("state", "final weights", STEP_TIMEOUT_MS, (m) => m.kind === "final", [active[0].rank]);
    active[0].client.send({ t: "state", rank: active[0].rank, kind: "final" });
    for (const f of (await stateFrom(final)).files) await run.writeFile(f.name, f.data);
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
      if (err instanceof UserError && !cancelled && !err.hint) {
        throw new JobFailed(err.message, `Metrics and checkpoints so far are in ${runDir.dir}.`, err.exitCode);
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
    for (const client of new Set(active.map((r) => r.client))) {
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
      status(`Leaving out ${e.reason}`);
    }
    const stay = active.filter((_, k) => !out.has(k));
    const stayRates = rates.filter((_, k) => !out.has(k));
    active = stay;
    epoch += 1;
    const formed = gather.expect("ring_ready", `the ring re-formed without rank(s) ${[...out].join(", ")}`, RING_TIMEOUT_MS);
    for (const c of new Set(ranks.map((r) => r.client))) c.send({ t: "ring", epoch, members: stay.map((r) => r.rank) });
    await formed;
    reporter.handle({ type: "workers", workers: ranks.map((r) => ({ ...r.row })) });
    return new Rebalancer(config.batch_size, stayRates);
  }
}
