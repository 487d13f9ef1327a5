import type { LoadedConfig } from "../../config/load.js";
import { configErrorAt } from "../../config/load.js";
import { UserError, errorMessage } from "../../errors.js";
import { WarningLimiter } from "../../net/bounds.js";
import { cleanText } from "../../protocol/text.js";
import { DilocoStrategy } from "../../strategy/diloco.js";
import { SyncStrategy } from "../../strategy/sync.js";
import { PipelineStrategy } from "../../strategy/pipeline.js";
import { planPipeline, profilePipeline, type PipelineStart } from "./pipelinePhases.js";
import type { Reporter, StatusLevel } from "../events.js";
import type { ProviderClient } from "../providerClient.js";
import type { RunDir } from "../runDir.js";
import type { Incoming } from "./answers.js";
import { CollectivePlanner, estimateGradientBytes } from "./collective.js";
import { Commits } from "./commit.js";
import { FaultError, JobFailed, TaskFailed, taskErrorHint, type Fault } from "./errors.js";
import { Exchanges } from "./exchanges.js";
import { Membership } from "./membership.js";
import { transition, survivesFaults, type Phase } from "./phase.js";
import { openRunDir, probeLinks, restore, startWorkers, syncWeights } from "./phases.js";
import { Providers } from "./providers.js";
import { route } from "./routing.js";
import type { Run } from "./run.js";
import { trainRounds } from "./rounds.js";
import { Tally, type TrainSummary } from "./tally.js";

export { HASH_EVERY } from "./rounds.js";
export { JobFailed, type Fault } from "./errors.js";
export type { TrainSummary } from "./tally.js";

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
  /** --key: the researcher's identity key file (default: the one under the user's config folder). */
  keyFile?: string;
  /** false: local providers run jobs unconfined (--no-sandbox). */
  sandbox?: boolean;
}

/**
 * `nimble train`: find or start providers, ship the task, assign ranks and the ring, run
 * the rounds, and write the run directory. The run loop is `train` below.
 */
export async function runTraining(opts: TrainOptions): Promise<{ runDir: string; summary: TrainSummary }> {
  const job = new Job(opts);
  try {
    return await job.train();
  } catch (err) {
    throw await job.failed(err);
  } finally {
    await job.close();
  }
}

class Job {
  readonly config: LoadedConfig["config"];
  readonly exchanges = new Exchanges();
  readonly commits = new Commits();
  readonly tally = new Tally();
  readonly providers: Providers;
  readonly collective: CollectivePlanner;
  membership = new Membership([]);
  #phase: Phase = "connecting";
  #dir: RunDir | null = null;
  /** Ctrl-C while training: stop after the step in flight, leaving a checkpoint to resume from. */
  stopRequested = false;
  readonly #onAbort = () => this.#cancel();
  readonly #warnings = new WarningLimiter();

  constructor(private readonly opts: TrainOptions) {
    this.config = opts.loaded.config;
    this.collective = new CollectivePlanner(this.config);
    this.providers = new Providers(opts, {
      message: (client, m) => this.#onMessage(client, m),
      lost: (client, reason) => this.#onLost(client, reason),
      status: (message) => this.status(message),
      report: (event) => opts.reporter.handle(event),
    });
    opts.signal?.addEventListener("abort", this.#onAbort);
    if (opts.signal?.aborted) this.#cancel();
  }

  /** The run loop: connect, start, restore, sync, probe links, then the rounds; finish. */
  async train(): Promise<{ runDir: string; summary: TrainSummary }> {
    // A pipeline's layers are profiled first: a task that cannot be split fails before any provider starts.
    const profiled = this.config.parallel && !this.opts.resume ? await profilePipeline(this.#partsBeforeStart(), this.opts.loaded, this.#workersExpected()) : null;
    this.providers.clock = this.tally.startup;
    await this.providers.connect();
    this.membership = new Membership(this.providers.ranks.map((r) => r.rank));
    // Planned before the run folder exists, so a plan that cannot fit leaves none behind (a resumed run keeps its checkpoint's).
    let pipeline = this.config.parallel && !this.opts.resume ? await planPipeline(this.#partsBeforeStart(), this.opts.loaded, null, profiled ? Promise.resolve(profiled) : null) : null;
    const { dir, checkpoint } = await openRunDir(this.#partsBeforeDir(), this.opts.loaded, this.opts.resume, await this.providers.package());
    this.#dir = dir;
    if (this.config.parallel && this.opts.resume) pipeline = await planPipeline(this.#partsBeforeStart(), this.opts.loaded, checkpoint, null);
    this.providers.pipeline = pipeline?.spec ?? null;
    this.#enter("starting");
    const run = this.#run(dir, pipeline);
    this.providers.reconnectWhile(() => survivesFaults(this.#phase), (rank) => this.membership.isActive(rank));
    const info = await startWorkers(run);
    // With --set overrides, the run's config.yaml is rewritten once the checkpoint is loaded everywhere.
    // A checkpoint gives every replica its state (under diloco each rank's own local weights,
    // which a broadcast of rank 0's would overwrite); a fresh start broadcasts rank 0's weights.
    // Under pipeline every layout starts from the same seeded layers: nothing to broadcast.
    if (checkpoint) await restore(run, checkpoint, (this.opts.loaded.overridden ? this.opts.loaded.text : undefined));
    else if (pipeline) for (const r of this.providers.ranks) r.row.state = "training";
    else await syncWeights(run);
    this.tally.startup.mark("sync");
    const mayLeaveOut = this.config.balance === "measured" && this.config.leave_out_slow && this.providers.clients.length > 1;
    // Leaving out slow workers, and choosing ring or direct all-reduces, weigh the links measured here.
    const members = this.membership.active.length;
    if (mayLeaveOut || (this.collective.wantsLinks(members) && this.providers.clients.length > 1)) await probeLinks(run);
    if (this.collective.tracked) {
      this.collective.setLinks(this.tally.links);
      this.collective.gradientBytes = estimateGradientBytes(this.config, info.param_bytes);
      if (members > 1) this.status(this.collective.describe(members));
    }
    this.#enter("training");
    const finalFiles = await trainRounds(run, { first: checkpoint?.step ?? 0, verifyFirst: Boolean(checkpoint) || Boolean(pipeline), valSize: info.val_size, mayLeaveOut, stopRequested: () => this.stopRequested });
    this.#enter("ended");
    for (const f of finalFiles) await dir.writeFile(f.name, f.data);
    for (const rank of this.membership.active) this.providers.ranks[rank].row.state = "done";
    const summary = this.#summary("completed");
    await dir.writeSummary(summary as unknown as Record<string, unknown>);
    await dir.close();
    this.opts.reporter.handle({ type: "workers", workers: this.providers.rows() });
    this.opts.reporter.handle({ type: "done", run_dir: dir.dir, summary: summary as unknown as Record<string, unknown> });
    return { runDir: dir.dir, summary };
  }

  #run(dir: RunDir, pipeline: PipelineStart | null): Run {
    const self = this;
    return {
      config: this.config,
      providers: this.providers,
      exchanges: this.exchanges,
      get membership() {
        return self.membership;
      },
      commits: this.commits,
      tally: this.tally,
      strategy: this.#strategy(pipeline),
      dir,
      ...(this.collective.tracked ? { collective: this.collective } : {}),
      ...(pipeline ? { pipelineBounds: pipeline.bounds } : {}),
      phase: () => this.#phase,
      enter: (phase) => this.#enter(phase),
      status: (message, level) => this.status(message, level),
      report: (event) => this.opts.reporter.handle(event),
    };
  }

  #strategy(pipeline: PipelineStart | null): SyncStrategy {
    const ranks = this.providers.ranks;
    const opts = {
      batchSize: this.config.batch_size,
      balance: this.config.balance,
      compression: this.config.compression,
      // Shares follow each worker's measured speed: its profile first, then every step's compute.
      initialRates: ranks.map((r) => r.client.info.profile?.matmul_gflops_fp32 ?? 0),
    };
    const members = ranks.map((r) => r.rank);
    const strategy = this.config.strategy;
    if (pipeline) return new PipelineStrategy(members, opts, pipeline.layout, this.config.parallel!);
    return strategy.name === "diloco" ? new DilocoStrategy(members, opts, strategy) : new SyncStrategy(members, opts);
  }

  /** Workers the config implies before providers answer: local ones, or one per listed provider. */
  #workersExpected(): number {
    return this.config.providers.length > 0 ? this.config.providers.length : (this.opts.local ?? this.config.local_workers);
  }

  #partsBeforeStart() {
    return { config: this.config, providers: this.providers, tally: this.tally, status: (m: string, l?: StatusLevel) => this.status(m, l) };
  }

  #partsBeforeDir() {
    return { config: this.config, tally: this.tally, status: (m: string, l?: StatusLevel) => this.status(m, l), report: this.opts.reporter.handle.bind(this.opts.reporter) };
  }

  #enter(phase: Phase) {
    this.#phase = transition(this.#phase, phase);
  }

  status(message: string, level: StatusLevel = "info") {
    this.opts.reporter.handle({ type: "status", message, level });
  }

  #onMessage(client: ProviderClient, m: Incoming) {
    const r = route(m, client.address, {
      phase: this.#phase,
      epoch: this.membership.epoch,
      isActive: (rank) => this.membership.isActive(rank),
      hosts: (rank) => this.providers.ranks[rank]?.client === client,
    });
    switch (r.action) {
      case "log": {
        if (m.t !== "log") return;
        // A provider's repeated warnings are held back (its text was cleaned at intake).
        const level = m.level === "error" ? "warn" : m.level;
        const line = m.line;
        const shown = level === "warn" ? this.#warnings.pass(`${client.address} ${line.slice(0, 48).replace(/\d+/g, "#")}`, line) : line;
        if (shown) this.opts.reporter.handle({ type: "log", source: client.address, line: shown, level });
        return;
      }
      case "config error":
        return this.exchanges.fail(configErrorAt(this.opts.loaded, r.field, r.message));
      case "fault":
        return this.#noteFault({ ...r.fault, at: Date.now() });
      case "retell":
        this.membership.joinerGone(r.rank);
        this.providers.ranks[r.rank].row.state = "lost";
        this.tally.retell([r.rank], r.message, this.membership.pendingFaults);
        return this.status(r.message, "warn");
      case "fail":
        return this.exchanges.fail(r.kind === "task" ? new TaskFailed(r.message, r.where, taskErrorHint(r.kind)) : new JobFailed(r.message, taskErrorHint(r.kind)));
      case "joiner":
        this.membership.joinerReady(r.rank);
        this.providers.ranks[r.rank].row.state = "joining";
        return this.status(`Rank ${r.rank} on ${client.address} is ready to join`);
      case "deliver":
        return this.exchanges.deliver(r.message);
      case "send package":
        return void this.providers.sendPackage(client, r.hash).catch((err) => this.exchanges.fail(err instanceof Error ? err : new Error(String(err))));
      case "ignore":
        return;
    }
  }

  #onLost(client: ProviderClient, reason: string) {
    const hosted = this.providers.ranksOf(client).map((r) => r.rank);
    const gone = hosted.filter((rank) => this.membership.isActive(rank));
    for (const rank of hosted) this.membership.joinerGone(rank);
    const why = `${client.address}: ${cleanText(reason, 1000)}`;
    if (gone.length > 0 || !survivesFaults(this.#phase)) this.#noteFault({ kind: "provider lost", ranks: gone, reason: why, at: Date.now() });
  }

  #noteFault(fault: Fault) {
    if (!survivesFaults(this.#phase)) {
      const what = fault.kind === "provider lost" ? "Lost provider" : fault.kind === "worker died" ? "A worker died" : "The ring broke";
      this.exchanges.fail(new JobFailed(`${what}: ${fault.reason}`));
      return;
    }
    if (!this.membership.noteFault(fault)) return this.tally.retell(fault.ranks, fault.reason, this.membership.pendingFaults);
    this.status(`Fault: ${fault.kind}: ${fault.reason}`, "warn");
    this.exchanges.interrupt(new FaultError(fault));
  }

  #cancel() {
    if (survivesFaults(this.#phase) && !this.stopRequested) {
      this.stopRequested = true;
      this.status("Stopping after this step and writing a checkpoint (Ctrl-C again stops at once)", "warn");
      return;
    }
    this.exchanges.fail(new UserError("Training cancelled", "Checkpoints already written are kept in the run directory.", 130));
  }

  #summary(status: TrainSummary["status"], error?: string): TrainSummary {
    const workers = this.providers.ranks.map((r) => ({ id: r.row.id, rank: r.rank, provider: r.row.provider, device: r.device, samples: r.row.samples }));
    const summary = this.tally.summary(this.config, status, workers, this.#dir?.dir ?? "", error);
    return this.collective.tracked ? { ...summary, collective: this.collective.summary(this.membership.active.length) } : summary;
  }

  /** The error to rethrow: the run directory keeps a summary, and the hint says where it is. */
  async failed(err: unknown): Promise<unknown> {
    const cancelled = err instanceof UserError && err.exitCode === 130;
    for (const rank of this.membership.active) {
      const row = this.providers.ranks[rank]?.row;
      if (row && row.state !== "done") row.state = "failed";
    }
    this.exchanges.fail(err instanceof Error ? err : new Error(String(err)));
    const dir = this.#dir;
    if (!dir) return err;
    const summary = this.#summary(cancelled ? "cancelled" : "failed", errorMessage(err));
    await dir.writeSummary(summary as unknown as Record<string, unknown>).catch(() => {});
    await dir.close().catch(() => {});
    if (err instanceof UserError && !cancelled && !(err.hint ?? "").includes(dir.dir)) {
      // A job that failed before its first step has nothing to resume: its folder keeps the log.
      const where = summary.steps > 0 ? `Metrics and checkpoints so far are in ${dir.dir}.` : `The run folder ${dir.dir} is marked failed; its train.log has the details.`;
      const hint = [err.hint, where].filter(Boolean).join(" ");
      if (err instanceof TaskFailed) return new TaskFailed(err.message, err.where, hint);
      return new JobFailed(err.message, hint, err.exitCode);
    }
    return err;
  }

  async close() {
    this.opts.signal?.removeEventListener("abort", this.#onAbort);
    this.#enter("ended");
    await this.providers.close();
  }
}
