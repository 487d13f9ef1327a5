/**
 * Warm spares: a provider keeps one worker per device started ahead of its next job, with
 * torch imported, so that job's first step does not wait for it. A spare is a worker like
 * any other, under the same confinement: bubblewrap with the provider's read-only binds and
 * an empty job folder of its own (its cwd and only writable place), made before any job.
 * At hand-off that folder becomes the job's: the task's files are written into it and
 * what is job-specific (variables, threads, seeds, the task's import) comes with `init`.
 * A job that needs anything else bound or installed starts its workers cold (canUseSpare).
 */
import { cp, mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { errorMessage } from "../../errors.js";
import { DEFAULT_LIMITS } from "../../runtime/limits.js";
import { gpuDeviceNodes } from "../../runtime/sandbox.js";
import { WorkerProcess, type WorkerExit } from "../../runtime/worker.js";
import { canUseSpare, type JobNeeds, type WorkerSetup } from "./spareFit.js";
import type { LogLevel, ProviderOptions } from "./types.js";

/** Spares that exit before torch is imported, one after another, before the provider stops keeping them. */
const MAX_FAILED_STARTS = 3;

export type SpareState = "starting" | "ready" | "taken" | "exited" | "off";
export interface SpareEvent {
  type: "spare";
  device: string;
  state: SpareState;
  pid: number | null;
  detail?: string;
}

type Settings = Pick<ProviderOptions, "python" | "confinement" | "limits">;

/** The setup of a worker on `device` with `extraReadOnly` bound beside the provider's own binds. */
export function workerSetup(opts: Settings, device: string, extraReadOnly: string[] = []): WorkerSetup {
  const confined = opts.confinement?.kind === "bwrap" ? opts.confinement : null;
  return {
    python: opts.python.python,
    sandbox: confined ? "bwrap" : "none",
    readOnly: confined ? [...confined.readOnly, ...extraReadOnly] : [],
    devices: confined ? gpuDeviceNodes([device]) : [],
    device,
    limits: opts.limits ?? DEFAULT_LIMITS,
  };
}

/** Start one worker process of `setup` in job folder `cwd`. */
export function launchWorker(opts: Settings, setup: WorkerSetup, start: { cwd: string; label: string; env?: Record<string, string>; cgroup: string; onLog: (line: string) => void }): WorkerProcess {
  const confined = opts.confinement?.kind === "bwrap" ? opts.confinement : null;
  return new WorkerProcess({
    python: setup.python,
    ...start,
    sandbox: confined ? { support: confined.support, readOnly: [...setup.readOnly], devices: [...setup.devices] } : null,
    limits: setup.limits,
  });
}

interface Spare {
  worker: WorkerProcess;
  setup: WorkerSetup;
  onExit: (exit: WorkerExit) => void;
}

/** What a job got: the folder its spares run in (null: none used), a worker per rank that took one, and why the others did not. */
export interface Claim {
  dir: string | null;
  workers: Map<number, WorkerProcess>;
  cold: Map<number, string>;
}

/**
 * The job's folder and its package's folder as its workers see them: the spares' folder,
 * with the package copied in (a running sandbox cannot gain a bind), when one was taken;
 * else a new folder, and the package where the cache keeps it (bound read-only).
 */
export async function jobFolder(claim: Claim | null, packageDir: string | undefined): Promise<{ dir: string; packageDir: string | undefined }> {
  if (!claim?.dir) return { dir: await mkdtemp(path.join(os.tmpdir(), "nimble-job-")), packageDir };
  if (!packageDir) return { dir: claim.dir, packageDir };
  const copy = path.join(claim.dir, "package");
  await cp(packageDir, copy, { recursive: true });
  return { dir: claim.dir, packageDir: copy };
}

/** The line that says how rank `rank`'s worker starts: the warm one, or cold and why. */
export function handOffLine(claim: Claim, rank: number): string | null {
  const warm = claim.workers.get(rank);
  if (warm) return `rank ${rank}: using the warm worker (pid ${warm.pid}${warm.startedAt === null ? ", still importing torch" : ""})`;
  const why = claim.cold.get(rank);
  return why ? `rank ${rank}: starting its worker cold: ${why}` : null;
}

export class Spares {
  #dir: string | null = null;
  readonly #spares = new Map<string, Spare>();
  #filling: Promise<void> | null = null;
  #failedStarts = 0;
  #closed = false;

  constructor(
    private readonly opts: Settings,
    private readonly devices: string[],
    private readonly log: (line: string, level?: LogLevel) => void,
    private readonly report: (e: SpareEvent) => void,
  ) {
    if (opts.confinement?.kind === "unavailable") this.#closed = true; // jobs are refused: nothing to keep warm
  }

  /** Which devices have a spare now, and whether its torch is imported. */
  status(): { device: string; state: "starting" | "ready"; pid: number | null }[] {
    return [...this.#spares].map(([device, s]) => ({ device, state: s.worker.startedAt !== null ? "ready" : "starting", pid: s.worker.pid ?? null }));
  }

  /** Start a spare for every device that has none (in a new job folder when none is kept). */
  fill(): Promise<void> {
    this.#filling ??= this.#fill().finally(() => (this.#filling = null));
    return this.#filling;
  }

  async #fill() {
    if (this.#closed || this.#failedStarts >= MAX_FAILED_STARTS) return;
    this.#dir ??= await mkdtemp(path.join(os.tmpdir(), "nimble-job-"));
    for (const device of this.devices) if (!this.#spares.has(device) && !this.#closed) this.#start(device, this.#dir);
  }

  #start(device: string, dir: string) {
    const setup = workerSetup(this.opts, device);
    const worker = launchWorker(this.opts, setup, { cwd: dir, label: `warm ${device}`, cgroup: `nimble-${process.pid}-${path.basename(dir)}-spare-${device.replace(/\W/g, "")}`, onLog: (line) => this.log(line, "debug") });
    const began = performance.now();
    const onExit = (exit: WorkerExit) => {
      this.#spares.delete(device);
      const started = worker.startedAt !== null;
      if (!started) this.#failedStarts += 1;
      const how = exit.fault ?? (exit.signal ? `was killed by ${exit.signal}` : `exited with code ${exit.code}`);
      const giveUp = this.#failedStarts >= MAX_FAILED_STARTS;
      const detail = `the warm worker for ${device} ${how} before a job came${giveUp ? `; it failed to start ${MAX_FAILED_STARTS} times, so jobs start their workers cold` : ""}`;
      this.log(detail, "warn");
      this.report({ type: "spare", device, state: "exited", pid: worker.pid ?? null, detail });
      if (this.#spares.size === 0) void this.#dropDir();
      if (!giveUp && !this.#closed) void this.fill();
    };
    worker.once("exit", onExit);
    worker.once("started", () => {
      this.#failedStarts = 0;
      const detail = `a warm worker is ready for the next job on ${device} (torch imported in ${((performance.now() - began) / 1000).toFixed(1)} s)`;
      this.log(detail);
      this.report({ type: "spare", device, state: "ready", pid: worker.pid ?? null, detail });
    });
    worker.on("error", (err) => {
      this.log(`the warm worker for ${device}: ${errorMessage(err)}`, "warn");
      worker.kill();
    });
    this.#spares.set(device, { worker, setup, onExit });
    this.report({ type: "spare", device, state: "starting", pid: worker.pid ?? null });
  }

  /**
   * A job's ranks take the spares that fit them (`needs` is what a cold start would make
   * for a device). Once one is taken the folder is the job's: spares left in it stop.
   */
  claim(ranks: { rank: number; device: string }[], needs: (device: string) => JobNeeds): Claim {
    const claim: Claim = { dir: null, workers: new Map(), cold: new Map() };
    for (const { rank, device } of ranks) {
      const spare = this.#spares.get(device);
      const verdict = canUseSpare(spare ? { ...spare.setup, alive: spare.worker.exited === null } : null, needs(device));
      if (!verdict.use || !spare) {
        claim.cold.set(rank, verdict.use ? "no warm worker" : verdict.why);
        continue;
      }
      spare.worker.off("exit", spare.onExit);
      spare.worker.removeAllListeners("error").removeAllListeners("started");
      this.#spares.delete(device);
      claim.workers.set(rank, spare.worker);
      this.report({ type: "spare", device, state: "taken", pid: spare.worker.pid ?? null });
    }
    if (claim.workers.size > 0) {
      claim.dir = this.#dir;
      this.#dir = null;
      for (const [device, spare] of this.#spares) {
        spare.worker.off("exit", spare.onExit);
        void spare.worker.stop();
        this.#spares.delete(device);
      }
    }
    return claim;
  }

  async #dropDir() {
    const dir = this.#dir;
    this.#dir = null;
    if (dir) await rm(dir, { recursive: true, force: true });
  }

  /** --no-warm, or the provider stops: spares end and their folder goes. */
  async close(): Promise<void> {
    this.#closed = true;
    await this.#filling;
    const spares = [...this.#spares.values()];
    this.#spares.clear();
    for (const s of spares) s.worker.off("exit", s.onExit);
    await Promise.all(spares.map((s) => s.worker.stop()));
    await this.#dropDir();
  }
}
