import { EventEmitter } from "node:events";
import type { Socket } from "node:net";
import os from "node:os";
import { execa } from "execa";
import { ProtocolError, errorMessage } from "../errors.js";
import type { ToWorker } from "../protocol/workerOps.js";
import { makeWorkerCgroup, memoryFault, watchMemory, type WorkerCgroup, type WorkerLimits } from "./limits.js";
import { forEachLine } from "./lines.js";
import { PACKAGE_ROOT, PYTHON_RUNTIME_DIR, packageReadOnly } from "./paths.js";
import { bwrapArgs, type SandboxSupport } from "./sandbox.js";
import { SharedBuffer, WORKER_SHARED_FD } from "./sharedBuffer.js";
import { encodeWorkerFrame, WorkerFrameDecoder, type WorkerMessage } from "./workerLink.js";

export interface WorkerStartOptions {
  python: string;
  /** Job directory: the worker's cwd, where the shipped task file lies. */
  cwd: string;
  /** Prefix for the worker's log lines, e.g. `rank 1`. */
  label: string;
  onLog: (line: string) => void;
  /** The worker's own variables: it gets these and a minimal base, never the provider's environment. */
  env?: Record<string, string>;
  /** Confinement: bubblewrap with these read-only folders and device nodes (null: unconfined, --no-sandbox). */
  sandbox?: { support: SandboxSupport; readOnly: string[]; devices: string[] } | null;
  /** The owner's limits; a cgroup named `cgroup` enforces them where one is writable. */
  limits?: WorkerLimits;
  cgroup?: string;
  /**
   * Share a buffer with the worker for its all-reduces (fd 4; src/runtime/sharedBuffer.ts),
   * where the native addon is built (default true; false: everything over the socket).
   */
  sharedBuffer?: boolean;
}

/** What every worker gets, and nothing of the provider's environment (no token, no secrets). */
function workerEnv(extra: Record<string, string> = {}): Record<string, string> {
  return {
    PATH: "/usr/local/bin:/usr/bin:/bin",
    HOME: "/tmp",
    LANG: "C.UTF-8",
    PYTHONPATH: PYTHON_RUNTIME_DIR,
    PYTHONUNBUFFERED: "1",
    PYTHONDONTWRITEBYTECODE: "1",
    NIMBLE_HOME: PACKAGE_ROOT,
    // glibc keeps freed memory at the top of the heap up to a threshold that grows with
    // every large block freed, so a step's freed gradients stayed resident (+100 MB for a
    // 67 MB model here): trimmed past 1 MiB, a worker's resident memory is what it holds,
    // which --max-memory and the pipeline's stage sizes rely on (same speed, measured).
    MALLOC_TRIM_THRESHOLD_: String(1024 * 1024),
    // Ask for a `started` message once torch is imported (a warm spare's readiness; start-up timing).
    NIMBLE_ANNOUNCE_START: "1",
    ...extra,
  };
}

/** The command line of one worker: python, under bwrap when confined, joining its cgroup first. */
function workerCommand(opts: WorkerStartOptions, cgroup: WorkerCgroup | null): { file: string; args: string[]; env: Record<string, string> } {
  const env = workerEnv(opts.env);
  let command = [opts.python, "-u", "-m", "nimble_worker"];
  let outerEnv = env;
  if (opts.sandbox) {
    const plan = { readOnly: [...opts.sandbox.readOnly, ...packageReadOnly()], jobDir: opts.cwd, env, devices: opts.sandbox.devices };
    command = [opts.sandbox.support.bwrap!, ...bwrapArgs(plan, command)];
    outerEnv = { PATH: env.PATH!, LANG: env.LANG! };
  }
  if (cgroup) {
    // Join the cgroup, then become the worker: everything it starts is counted from its first instruction.
    const join = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 97; shift; n=$((n-1)); done; exec "$@"';
    command = ["/bin/sh", "-c", join, "sh", String(cgroup.procs.length), ...cgroup.procs, ...command];
  }
  return { file: command[0]!, args: command.slice(1), env: outerEnv };
}

function startWorkerProcess(opts: WorkerStartOptions, cgroup: WorkerCgroup | null, shared: SharedBuffer | null) {
  const { file, args, env } = workerCommand(opts, cgroup);
  return execa(file, args, {
    cwd: opts.cwd,
    env,
    extendEnv: false,
    // fd 3: the worker link; fd 4: the shared buffer (inherited through sh and bwrap as is).
    // (execa's types leave out a descriptor number past fd 2; it passes it to spawn as is.)
    stdio: (shared ? ["ignore", "pipe", "pipe", "pipe", shared.fd] : ["ignore", "pipe", "pipe", "pipe"]) as ["ignore", "pipe", "pipe", "pipe"],
    buffer: false,
    reject: false,
    detached: true,
    cleanup: true,
  });
}

function signalName(n: number): string | null {
  return Object.entries(os.constants.signals).find(([, v]) => v === n)?.[0] ?? null;
}

export interface WorkerExit {
  code: number | null;
  signal: string | null;
  /** True when we asked it to stop (stop message, cancel): not a crash. */
  expected: boolean;
  /** Ended by the owner's limits (e.g. --max-memory): why, in words. Such a worker is not restarted. */
  fault?: string;
}

/**
 * One supervised Python worker (`python -m nimble_worker`). Messages travel on fd 3, a UNIX
 * socket pair; stdout/stderr are log lines. The worker leads its own process group so that
 * kill() takes down anything it started too.
 */
export class WorkerProcess extends EventEmitter<{ message: [WorkerMessage]; started: []; exit: [WorkerExit]; error: [Error] }> {
  private readonly child: ReturnType<typeof startWorkerProcess>;
  private readonly link: Socket;
  private readonly decoder = new WorkerFrameDecoder();
  private stopping = false;
  private fault: string | null = null;
  exited: WorkerExit | null = null;
  /** What enforces this worker's limits beyond its own rlimits (for the owner's view). */
  readonly enforcedBy: string[];
  readonly spawnedAt = performance.now();
  /** Prefix of its log lines, and where they go: a warm spare's change when its job takes it. */
  label: string;
  onLog: (line: string) => void;
  /** performance.now() when it said `started` (torch imported, waiting for `init`); null before. */
  startedAt: number | null = null;
  /** The memory it shares for its all-reduces (its fd 4), or null: all over the socket. */
  readonly shared: SharedBuffer | null;
  /** The worker's descriptor of `shared` (the init order tells it), when there is one. */
  readonly sharedFd: number | undefined;

  constructor(opts: WorkerStartOptions) {
    super();
    this.label = opts.label;
    this.onLog = opts.onLog;
    const cgroup = opts.limits && opts.cgroup ? makeWorkerCgroup(opts.cgroup, opts.limits) : null;
    this.enforcedBy = cgroup ? cgroup.enforces.map((c) => `${c} cgroup`) : [];
    // A new file for every worker process: nothing a dead worker's collectives still touch is shared with its successor.
    this.shared = opts.sharedBuffer === false ? null : SharedBuffer.create(`nimble-${opts.label}`);
    this.sharedFd = this.shared ? WORKER_SHARED_FD : undefined;
    this.child = startWorkerProcess(opts, cgroup, this.shared);
    this.link = this.child.stdio[3] as Socket;
    const maxMemory = opts.limits?.maxMemoryBytes ?? null;
    const confined = Boolean(opts.sandbox);
    const stopWatch =
      maxMemory !== null && this.child.pid
        ? watchMemory(this.child.pid, maxMemory, (fault) => {
            this.fault = fault;
            this.kill();
          })
        : () => {};
    for (const stream of [this.child.stdout, this.child.stderr]) forEachLine(stream, (line) => this.onLog(`[${this.label}] ${line}`));
    this.link.on("data", (chunk: Buffer) => {
      let messages: WorkerMessage[];
      try {
        messages = this.decoder.push(chunk);
      } catch (err) {
        this.emit("error", err instanceof Error ? err : new ProtocolError(errorMessage(err)));
        this.kill();
        return;
      }
      for (const m of messages) {
        // `started` is this process's own lifecycle (sent once, before init): not the job's.
        if (m.header.op === "started" && this.startedAt === null) {
          this.startedAt = performance.now();
          this.emit("started");
        } else this.emit("message", m);
      }
    });
    this.link.on("error", () => {
      // The worker went away; the exit handler reports it.
    });
    void this.child.then(async (result) => {
      stopWatch();
      this.shared?.close();
      // The kernel may have ended it first, at the cgroup's memory limit (under bwrap the
      // SIGKILL shows as exit code 137, not as a signal).
      if (!this.fault && maxMemory !== null && !this.stopping && (await cgroup?.oomKilled())) this.fault = memoryFault(maxMemory, null);
      await cgroup?.remove();
      // bwrap reports a child killed by signal N as exit code 128 + N: name the signal.
      const bySignal = confined && !result.signal && (result.exitCode ?? 0) > 128 ? signalName((result.exitCode ?? 0) - 128) : null;
      this.exited = {
        code: bySignal ? null : (result.exitCode ?? null),
        signal: result.signal ?? bySignal,
        expected: this.stopping && !this.fault,
        ...(this.fault ? { fault: this.fault } : {}),
      };
      this.emit("exit", this.exited);
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  /** One order (src/protocol/workerOps.ts); `payload` for those that carry bytes. */
  send(order: ToWorker, payload?: Uint8Array): void {
    if (this.exited || this.link.destroyed) return;
    for (const part of encodeWorkerFrame(order, payload)) this.link.write(part);
  }

  /** Ask the worker to finish; kill its process group if it has not exited after graceMs. */
  async stop(graceMs = 3000): Promise<WorkerExit> {
    this.stopping = true;
    if (this.exited) return this.exited;
    this.send({ op: "stop" });
    const timer = setTimeout(() => this.kill(), graceMs);
    const exit = await new Promise<WorkerExit>((resolve) => {
      if (this.exited) resolve(this.exited);
      else this.once("exit", resolve);
    });
    clearTimeout(timer);
    return exit;
  }

  /** SIGTERM then SIGKILL the worker's whole process group. */
  kill(): void {
    this.stopping = true;
    const pid = this.child.pid;
    if (!pid || this.exited) return;
    const signalGroup = (signal: NodeJS.Signals) => {
      try {
        process.kill(-pid, signal);
      } catch {
        try {
          process.kill(pid, signal);
        } catch {
          // already gone
        }
      }
    };
    signalGroup("SIGTERM");
    const timer = setTimeout(() => signalGroup("SIGKILL"), 2000);
    timer.unref();
    this.once("exit", () => clearTimeout(timer));
  }
}
