import { randomUUID } from "node:crypto";
import { directLinksSpec } from "./collective.js";
import { statSync } from "node:fs";
import { readFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { UserError, errorMessage } from "../../errors.js";
import type { PipelineSpec, ToProvider } from "../../protocol/messages.js";
import { probeHost, resolvePython, type PythonEnv } from "../../runtime/python.js";
import { lockRequirements, type RequirementsLock } from "../../runtime/requirements.js";
import type { TrainEvent, WorkerRow } from "../events.js";
import { startLocalProviders } from "../localProviders.js";
import { buildPackage, PACKAGE_CHUNK_BYTES, type TaskPackage } from "../package.js";
import { loadIdentity, type Identity } from "../../identity/identity.js";
import { issueCredential } from "../../identity/proof.js";
import { ProviderClient, ringUrl, type ProviderCredentials } from "../providerClient.js";
import type { Incoming } from "./answers.js";
import type { StartupClock } from "./startup.js";
import type { TrainOptions } from "./index.js";

/** How often providers that are away are tried again, and how long one try may take. */
const RECONNECT_INTERVAL_MS = 3_000;
const RECONNECT_TIMEOUT_MS = 5_000;

export interface Rank {
  rank: number;
  client: ProviderClient;
  device: string;
  row: WorkerRow;
  /** The worker's micro-batch cap as last reported (null: none; undefined: no report yet). */
  maxMicroBatch: number | null | undefined;
}

interface Target {
  address: string;
  /** Token mode, key mode, or both (the provider's key is then checked and the token proved). */
  token?: string;
  key?: string;
  optional: boolean;
}

/** What the providers tell their owner (the run loop). */
export interface ProviderEvents {
  message: (client: ProviderClient, m: Incoming) => void;
  lost: (client: ProviderClient, reason: string) => void;
  status: (message: string) => void;
  report: (event: TrainEvent) => void;
}

/**
 * The job's providers: the ones the config names (or local ones started here), their
 * connections, the ranks they host (one per device, in provider order; the ring follows
 * rank order), the job spec they are sent, and the reconnecting of those that are away.
 */
export class Providers {
  readonly ranks: Rank[] = [];
  readonly clients: ProviderClient[] = [];
  readonly #absent = new Map<string, Target>();
  readonly #targetOf = new Map<ProviderClient, Target>();
  readonly #cleanups: (() => Promise<void> | void)[] = [];
  readonly #job = randomUUID();
  #code: Buffer | null = null;
  #package: Promise<TaskPackage> | null = null;
  #identity: Identity | null = null;
  #pythonEnv: Promise<PythonEnv> | null = null;
  #lock: Promise<RequirementsLock | null> | null = null;

  constructor(
    private readonly opts: TrainOptions,
    private readonly events: ProviderEvents,
  ) {}

  get config() {
    return this.opts.loaded.config;
  }

  /** The researcher's identity: what the job's credentials are signed with. */
  get identity(): Identity {
    if (!this.#identity) throw new Error("the providers are not connected yet");
    return this.#identity;
  }

  #credentials(t: Target): ProviderCredentials {
    return { identity: this.identity, token: t.token, key: t.key };
  }

  /** 1-3: find or start the providers, connect and authenticate, and assign ranks. */
  async connect(): Promise<void> {
    this.#identity = await loadIdentity(this.opts.keyFile, { create: true });
    await this.package(); // a task folder that cannot be packaged fails here, before any provider starts
    await this.requirements(); // and requirements that do not resolve
    this.clock?.mark("config");
    const targets = await this.#targets();
    this.events.status(`Connecting to ${targets.length} provider${targets.length === 1 ? "" : "s"} as ${this.identity.fingerprint}`);
    const settled = await Promise.allSettled(targets.map((t) => ProviderClient.connect(t.address, this.#credentials(t))));
    settled.forEach((s, i) => {
      if (s.status === "fulfilled") {
        this.clients.push(s.value);
        this.#targetOf.set(s.value, targets[i]);
      } else if (targets[i].optional) {
        this.#absent.set(targets[i].address, targets[i]);
        this.events.status(`Optional provider ${targets[i].address} is not reachable (${errorMessage(s.reason)}); it joins when it comes up`);
      }
    });
    for (const c of this.clients) c.watchHeartbeat(this.config.faults.heartbeat_s * 1000);
    this.#cleanups.push(() => this.clients.forEach((c) => c.close()));
    const refused = settled.find((s, i) => s.status === "rejected" && !targets[i].optional);
    if (refused) throw (refused as PromiseRejectedResult).reason;
    if (this.clients.length === 0) throw new UserError("None of the providers is reachable", "Start `nimble provide` on at least one of them.");
    for (const client of this.clients) this.#addRanks(client);
    this.clock?.mark("connect");
    this.events.report({ type: "workers", workers: this.rows() });
    for (const client of this.clients) this.#attach(client);
  }

  async #targets(): Promise<Target[]> {
    const { loaded, env = process.env } = this.opts;
    const config = loaded.config;
    if (config.providers.length > 0) {
      return config.providers.map((p, i) => {
        const token = p.token ?? (p.key ? undefined : env.NIMBLE_TOKEN);
        if (!token && !p.key) {
          throw new UserError(
            `${loaded.path}: providers[${i}] (${p.address}) has neither a key nor a token`,
            "Add `key:` (the provider's key, from `nimble id` on that host) or `token:` (the one `nimble provide` printed), or set NIMBLE_TOKEN.",
            2,
          );
        }
        return { address: p.address, token, key: p.key, optional: p.optional };
      });
    }
    const count = this.opts.local ?? config.local_workers;
    const python = await this.#python();
    // One probe here (a managed environment's marker holds none) instead of one per local provider.
    const probe = python.probe ?? (await probeHost(python.python));
    this.clock?.mark("python");
    this.events.status(`Starting ${count} local provider${count === 1 ? "" : "s"} (python ${python.pythonVersion}, torch ${python.torchVersion})`);
    const local = await startLocalProviders({
      count,
      identity: this.identity,
      sandbox: this.opts.sandbox !== false,
      python: python.python,
      probe,
      threads: Math.max(1, Math.floor(os.cpus().length / count)),
      env,
      onLog: (source, line) => this.events.report({ type: "log", source, line }),
    });
    this.#cleanups.push(local.stop);
    this.clock?.mark("local_providers");
    // They run as this user, with this user's key, and admit only it (key mode).
    return local.providers.map((p) => ({ address: p.address, key: this.identity.key, optional: false }));
  }

  #addRanks(client: ProviderClient): Rank[] {
    return client.info.devices.map((device, index) => {
      const rank = this.ranks.length;
      const row: WorkerRow = {
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
      };
      const r: Rank = { rank, client, device: device.id, maxMicroBatch: undefined, row };
      this.ranks.push(r);
      return r;
    });
  }

  #attach(client: ProviderClient) {
    client.on("lost", (reason) => {
      client.close();
      const target = this.#targetOf.get(client);
      if (target && this.config.providers.length > 0) this.#absent.set(target.address, target);
      this.events.lost(client, reason);
    });
    client.on("message", (m) => this.events.message(client, m));
  }

  rows(): WorkerRow[] {
    return this.ranks.map((r) => ({ ...r.row }));
  }

  /** The providers hosting `ranks` (each once). */
  clientsOf(ranks: readonly number[]): ProviderClient[] {
    return [...new Set(ranks.map((r) => this.ranks[r].client))];
  }

  /** The ranks a provider hosts. */
  ranksOf(client: ProviderClient): Rank[] {
    return this.ranks.filter((r) => r.client === client);
  }

  /** Every rank's data-plane URL and its provider's key, in rank order. */
  ringPeers(): { rank: number; url: string; key: string }[] {
    return this.ranks.map((r) => ({ rank: r.rank, url: ringUrl(r.client.address), key: r.client.key }));
  }

  /** Send every connected provider the same message. */
  broadcast(message: ToProvider): void {
    for (const c of this.clientsOf(this.ranks.map((r) => r.rank))) c.send(message);
  }

  /** The task folder's package (built once; null for a task file, which travels in the job spec). */
  async package(): Promise<TaskPackage | null> {
    const { loaded } = this.opts;
    if (!statSync(loaded.taskPath).isDirectory()) return null;
    this.#package ??= buildPackage(loaded.taskPath, loaded.config.package_limit_mb * 2 ** 20);
    return this.#package;
  }

  /** Where start-up time goes (the run's tally's). */
  clock: StartupClock | null = null;

  /** Pipeline parallelism: what providers are told of the stages (null: no pipeline). */
  pipeline: PipelineSpec | null = null;

  /** This host's worker Python (local providers run it; requirements and the layer profile use it). */
  python(): Promise<PythonEnv> {
    return this.#python();
  }

  #python(): Promise<PythonEnv> {
    const { env = process.env } = this.opts;
    this.#pythonEnv ??= resolvePython({ python: this.opts.python, torchSpec: this.opts.torchSpec, env, onProgress: this.events.status });
    return this.#pythonEnv;
  }

  /** The config's requirements resolved into a lock (once; null when there are none, or the base has them all). */
  requirements(): Promise<RequirementsLock | null> {
    const wanted = this.config.requirements;
    this.#lock ??= wanted.length === 0 ? Promise.resolve(null) : this.#python().then(async (python) => {
      const lock = await lockRequirements(wanted, python.python, { onProgress: (line) => this.events.report({ type: "log", source: "requirements", line, ...(line.startsWith("  ") ? { level: "debug" } : {}) }), env: this.opts.env });
      if (lock) this.events.status(`Requirements: ${lock.packages.map((p) => `${p.name} ${p.version}`).join(", ")} (lock ${lock.hash.slice(0, 12)}), installed by each provider`);
      return lock;
    });
    return this.#lock;
  }

  /** A provider asked for the package (not in its cache): its chunks, in order, with backpressure. */
  async sendPackage(client: ProviderClient, hash: string): Promise<void> {
    const pkg = await this.package();
    if (!pkg || pkg.hash !== hash) return client.send({ t: "cancel", reason: `asked for package ${hash.slice(0, 12)}, which this job does not have` });
    this.events.status(`Sending the task package (${(pkg.blob.length / 1e6).toFixed(1)} MB, ${pkg.files.length} files) to ${client.address}`);
    for (let offset = 0; offset < pkg.blob.length; offset += PACKAGE_CHUNK_BYTES) {
      await client.drained();
      client.send({ t: "package_chunk", hash, offset, data: pkg.blob.subarray(offset, offset + PACKAGE_CHUNK_BYTES) });
    }
  }

  /** 4. The job spec: the task, the config and the ranks each provider hosts. */
  async sendJob(client: ProviderClient, join: boolean): Promise<void> {
    const pkg = await this.package();
    const lock = await this.requirements();
    this.#code ??= pkg ? Buffer.alloc(0) : await readFile(this.opts.loaded.taskPath);
    client.send({
      t: "job",
      job: this.#job,
      credential: issueCredential(
        this.identity,
        this.#job,
        client.key,
        this.ranksOf(client).map((r) => r.rank),
      ),
      task: { filename: pkg ? pkg.entry : path.basename(this.opts.loaded.taskPath), code: this.#code },
      ...(pkg ? { package: { hash: pkg.hash, bytes: pkg.blob.length, entry: pkg.entry } } : {}),
      ...(lock ? { requirements: { hash: lock.hash, lock: lock.lock } } : {}),
      config: this.config as unknown as Record<string, unknown>,
      world_size: this.ranks.length,
      ranks: this.ranksOf(client).map((r) => ({ rank: r.rank, device: r.device })),
      ring: this.ringPeers(),
      ...(join ? { join: true } : {}),
      ...(this.pipeline ? { pipeline: this.pipeline } : {}),
      ...(directLinksSpec(this.config) ? { collective: directLinksSpec(this.config)! } : {}),
    });
  }

  async startJob(): Promise<void> {
    for (const client of this.clients) await this.sendJob(client, false);
    this.#cleanups.push(() => this.clients.forEach((c) => c.send({ t: "cancel", reason: "job over" })));
  }

  /**
   * Providers that are optional and not up yet, or lost, are tried again while `accepting()`;
   * one that answers gets the job as a joiner (its old ranks, when its devices match).
   */
  reconnectWhile(accepting: () => boolean, isActive: (rank: number) => boolean): void {
    const connecting = new Set<string>();
    const timer = setInterval(() => {
      if (!accepting()) return;
      for (const target of this.#absent.values()) {
        if (connecting.has(target.address)) continue;
        connecting.add(target.address);
        ProviderClient.connect(target.address, this.#credentials(target), RECONNECT_TIMEOUT_MS).then(
          (client) => {
            connecting.delete(target.address);
            if (!accepting()) return client.close();
            this.#rejoin(client, target, isActive);
          },
          () => connecting.delete(target.address),
        );
      }
    }, RECONNECT_INTERVAL_MS);
    this.#cleanups.push(() => clearInterval(timer));
  }

  #rejoin(client: ProviderClient, target: Target, isActive: (rank: number) => boolean) {
    this.#absent.delete(target.address);
    this.#targetOf.set(client, target);
    this.clients.push(client);
    client.watchHeartbeat(this.config.faults.heartbeat_s * 1000);
    this.#attach(client);
    const old = this.ranks.filter((r) => r.row.provider === client.address && !isActive(r.rank));
    if (old.length === client.info.devices.length) {
      for (const r of old) Object.assign(r, { client, maxMicroBatch: undefined });
      for (const r of old) r.row.state = "starting";
    } else this.#addRanks(client);
    const n = client.info.devices.length;
    this.events.status(`Provider ${client.address} is back: starting its worker${n === 1 ? "" : "s"} to join`);
    this.events.report({ type: "workers", workers: this.rows() });
    void this.sendJob(client, true);
  }

  async close(): Promise<void> {
    for (const fn of this.#cleanups.reverse()) await fn();
    this.#cleanups.length = 0;
  }
}
