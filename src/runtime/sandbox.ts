/**
 * Confinement of a job's workers (issue "Trust 3 of 3"): each worker runs under bubblewrap
 * with its own user, PID, network, IPC, UTS and cgroup namespaces, an unprivileged uid and
 * no capabilities, a read-only view of the system, the Python environment and the worker
 * runtime, its job folder as the only writable place beside a private /tmp, a cleared
 * environment, and only the device nodes of its assigned GPUs. Its one way out is the
 * fd-3 socket to its provider (inherited through bwrap): the network namespace has
 * nothing but an unconnected loopback.
 */
import { execFile } from "node:child_process";
import { existsSync, lstatSync, readlinkSync } from "node:fs";
import path from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);

/** The uid and gid a worker has inside its sandbox (nobody). */
export const SANDBOX_UID = 65534;

export type SandboxKind = "bwrap" | "none";

/** What a provider can confine workers with, found once at start. */
export interface SandboxSupport {
  kind: SandboxKind;
  /** The bwrap binary (kind bwrap). */
  bwrap?: string;
  version?: string;
  /** Why confinement is unavailable (kind none). */
  reason?: string;
}

/** Find bubblewrap and check that it can make the namespaces a worker needs here. */
export async function detectSandbox(env: NodeJS.ProcessEnv = process.env): Promise<SandboxSupport> {
  const bwrap = env.NIMBLE_BWRAP || "bwrap";
  let version: string;
  try {
    version = (await run(bwrap, ["--version"], { timeout: 10_000 })).stdout.trim();
  } catch {
    return { kind: "none", reason: `bubblewrap (${bwrap}) is not installed (apt install bubblewrap)` };
  }
  try {
    await run(bwrap, [...namespaceArgs(), "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--", "/bin/true"], { timeout: 10_000 });
  } catch (err) {
    const stderr = String((err as { stderr?: unknown }).stderr ?? err).trim().split("\n")[0];
    return { kind: "none", reason: `bubblewrap cannot make user, PID and network namespaces here (${stderr})` };
  }
  return { kind: "bwrap", bwrap, version };
}

function namespaceArgs(): string[] {
  return ["--unshare-all", "--uid", String(SANDBOX_UID), "--gid", String(SANDBOX_UID), "--cap-drop", "ALL", "--die-with-parent", "--new-session"];
}

/** What one worker's sandbox holds. */
export interface SandboxPlan {
  /** Read-only: the Python environment's prefixes, the worker runtime, the package (its data). */
  readOnly: string[];
  /** The job folder: the worker's cwd and its only writable place (beside a private /tmp). */
  jobDir: string;
  /** Exactly the environment the worker gets. */
  env: Record<string, string>;
  /** Device nodes beyond /dev's basics: the assigned GPUs' (documented; not testable without one). */
  devices: string[];
}

/** System folders every program needs, read-only (a symlink on the host stays a symlink). */
const SYSTEM = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];
/** A few files of /etc that programs read (libraries, time zone), never all of /etc. */
const ETC = ["/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/nsswitch.conf", "/etc/alternatives"];

/** bwrap's arguments to run `command` in the sandbox of `plan`. */
export function bwrapArgs(plan: SandboxPlan, command: string[]): string[] {
  const args = [...namespaceArgs()];
  for (const dir of SYSTEM) {
    if (!existsSync(dir)) continue;
    if (lstatSync(dir).isSymbolicLink()) args.push("--symlink", readlinkSync(dir), dir);
    else args.push("--ro-bind", dir, dir);
  }
  for (const file of ETC) args.push("--ro-bind-try", file, file);
  // os.cpu_count() and torch's thread pools read it.
  args.push("--ro-bind-try", "/sys/devices/system/cpu", "/sys/devices/system/cpu");
  args.push("--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp");
  for (const dir of dedupe(plan.readOnly)) args.push("--ro-bind", dir, dir);
  for (const node of plan.devices) args.push("--dev-bind-try", node, node);
  args.push("--bind", plan.jobDir, plan.jobDir, "--chdir", plan.jobDir);
  args.push("--clearenv");
  for (const [k, v] of Object.entries(plan.env)) args.push("--setenv", k, v);
  return [...args, "--", ...command];
}

/** Drop folders inside others already listed (and system folders, bound anyway). */
function dedupe(dirs: string[]): string[] {
  const abs = [...new Set(dirs.map((d) => path.resolve(d)))].filter((d) => !SYSTEM.some((s) => d === s || d.startsWith(`${s}/`)));
  return abs.filter((d) => !abs.some((o) => o !== d && d.startsWith(`${o}/`))).sort();
}

/** The device nodes of CUDA devices `cuda:N` (plus the driver's shared nodes). */
export function gpuDeviceNodes(deviceIds: string[]): string[] {
  const indices = deviceIds.map((d) => /^cuda:(\d+)$/.exec(d)?.[1]).filter((i): i is string => i !== undefined);
  if (indices.length === 0) return [];
  return ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset", ...indices.map((i) => `/dev/nvidia${i}`)];
}

/** The prefixes an interpreter needs (its environment and the Python it was made from). */
export async function pythonPrefixes(python: string): Promise<string[]> {
  const code = "import json, os, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))]))";
  const { stdout } = await run(python, ["-c", code], { timeout: 60_000 });
  return JSON.parse(stdout) as string[];
}
