import { EventEmitter } from "node:events";
import type { Socket } from "node:net";
import { execa } from "execa";
import { ProtocolError, errorMessage } from "../errors.js";
import type { ToWorker } from "../protocol/workerOps.js";
import { forEachLine } from "./lines.js";
import { PACKAGE_ROOT, PYTHON_RUNTIME_DIR } from "./paths.js";
import { encodeWorkerFrame, WorkerFrameDecoder, type WorkerMessage } from "./workerLink.js";

export interface WorkerStartOptions {
  python: string;
  /** Job directory: the worker's cwd, where the shipped task file lies. */
  cwd: string;
  /** Prefix for the worker's log lines, e.g. `rank 1`. */
  label: string;
  onLog: (line: string) => void;
  env?: NodeJS.ProcessEnv;
}

function startWorkerProcess(python: string, cwd: string, env: NodeJS.ProcessEnv) {
  return execa(python, ["-u", "-m", "nimble_worker"], {
    cwd,
    env,
    stdio: ["ignore", "pipe", "pipe", "pipe"],
    buffer: false,
    reject: false,
    detached: true,
    cleanup: true,
  });
}

export interface WorkerExit {
  code: number | null;
  signal: string | null;
  /** True when we asked it to stop (stop message, cancel): not a crash. */
  expected: boolean;
}

/**
 * One supervised Python worker (`python -m nimble_worker`). Messages travel on fd 3, a UNIX
 * socket pair; stdout/stderr are log lines. The worker leads its own process group so that
 * kill() takes down anything it started too.
 */
export class WorkerProcess extends EventEmitter<{ message: [WorkerMessage]; exit: [WorkerExit]; error: [Error] }> {
  private readonly child: ReturnType<typeof startWorkerProcess>;
  private readonly link: Socket;
  private readonly decoder = new WorkerFrameDecoder();
  private stopping = false;
  exited: WorkerExit | null = null;

  constructor(opts: WorkerStartOptions) {
    super();
    const pythonPath = [PYTHON_RUNTIME_DIR, opts.env?.PYTHONPATH ?? process.env.PYTHONPATH].filter(Boolean).join(":");
    this.child = startWorkerProcess(opts.python, opts.cwd, { ...opts.env, PYTHONPATH: pythonPath, NIMBLE_HOME: PACKAGE_ROOT, PYTHONUNBUFFERED: "1" });
    this.link = this.child.stdio[3] as Socket;
    for (const stream of [this.child.stdout, this.child.stderr]) forEachLine(stream, (line) => opts.onLog(`[${opts.label}] ${line}`));
    this.link.on("data", (chunk: Buffer) => {
      let messages: WorkerMessage[];
      try {
        messages = this.decoder.push(chunk);
      } catch (err) {
        this.emit("error", err instanceof Error ? err : new ProtocolError(errorMessage(err)));
        this.kill();
        return;
      }
      for (const m of messages) this.emit("message", m);
    });
    this.link.on("error", () => {
      // The worker went away; the exit handler reports it.
    });
    void this.child.then((result) => {
      this.exited = {
        code: result.exitCode ?? null,
        signal: result.signal ?? null,
        expected: this.stopping,
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
