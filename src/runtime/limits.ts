/**
 * The owner's limits on one worker process (issue "Trust 3 of 3"):
 * - processes and threads: RLIMIT_NPROC, set by the worker on itself before any task code
 *   runs (nimble_worker/__main__.py), and a pids cgroup where one is writable (RLIMIT_NPROC
 *   does not bind a provider running as root);
 * - file size: RLIMIT_FSIZE, the same way;
 * - resident memory (`--max-memory`): a memory cgroup where one is writable, and always a
 *   watchdog that ends the worker with a named fault once its processes hold more (not
 *   RLIMIT_AS, which breaks CUDA's address-space reservations).
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, writeFileSync } from "node:fs";
import { readdir, readFile } from "node:fs/promises";
import path from "node:path";
import { formatBytes } from "../ui/format.js";

export interface WorkerLimits {
  /** Resident bytes of the worker's processes together (null: no limit). */
  maxMemoryBytes: number | null;
  /** Processes and threads the worker may have. */
  maxProcesses: number;
  /** The largest file it may write. */
  maxFileBytes: number;
}

export const DEFAULT_LIMITS: WorkerLimits = { maxMemoryBytes: null, maxProcesses: 512, maxFileBytes: 16 * 1024 ** 3 };

/** `--max-memory`: `8GB`, `1.5GiB`, `512MB`, or bytes; throws a message naming the form. */
export function parseSize(text: string): number {
  const m = /^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$/i.exec(text);
  const units: Record<string, number> = { "": 1, b: 1, k: 1e3, kb: 1e3, kib: 1024, m: 1e6, mb: 1e6, mib: 1024 ** 2, g: 1e9, gb: 1e9, gib: 1024 ** 3, t: 1e12, tb: 1e12, tib: 1024 ** 4 };
  const unit = units[(m?.[2] ?? "").toLowerCase()];
  const bytes = m && unit !== undefined ? Math.round(Number(m[1]) * unit) : NaN;
  if (!(bytes >= 64 * 1024 * 1024)) throw new Error(`expected a size of at least 64MB, such as 8GB, 1.5GiB or 512MB; found "${text}"`);
  return bytes;
}

/** A cgroup (v2, or v1's pids and memory hierarchies) that one worker's processes join. */
export interface WorkerCgroup {
  /** The cgroup.procs files a process writes its pid into to join. */
  procs: string[];
  /** What it enforces, for the owner's view. */
  enforces: ("pids" | "memory")[];
  /** Whether the kernel ended a process of it for memory since it was made. */
  oomKilled(): Promise<boolean>;
  remove(): Promise<void>;
}

const ROOT = "/sys/fs/cgroup";

/**
 * Make a cgroup for one worker (synchronously: a few writes to sysfs), or null where none
 * is writable; then only the rlimits and the watchdog hold.
 */
export function makeWorkerCgroup(name: string, limits: WorkerLimits): WorkerCgroup | null {
  try {
    if (existsSync(path.join(ROOT, "cgroup.controllers"))) return makeV2(name, limits);
    return makeV1(name, limits);
  } catch {
    return null;
  }
}

const tryWrite = (file: string, text: string) => {
  try {
    writeFileSync(file, text);
  } catch {
    // an optional knob this kernel lacks
  }
};
/** Remove the cgroup's folders; the last processes may take a moment to leave, so try a few times. */
const removeDirs = (dirs: string[]) => async () => {
  for (let attempt = 0; attempt < 20 && dirs.some(existsSync); attempt++) {
    for (const d of dirs) {
      try {
        rmdirSync(d);
      } catch {
        // still has a process, or gone
      }
    }
    if (dirs.some(existsSync)) await new Promise((r) => setTimeout(r, 100));
  }
};

function makeV2(name: string, limits: WorkerLimits): WorkerCgroup {
  const controllers = readFileSync(path.join(ROOT, "cgroup.controllers"), "utf8").split(/\s+/);
  const dir = path.join(ROOT, name);
  mkdirSync(dir);
  const enforces: WorkerCgroup["enforces"] = [];
  if (controllers.includes("pids")) {
    writeFileSync(path.join(dir, "pids.max"), String(limits.maxProcesses));
    enforces.push("pids");
  }
  if (limits.maxMemoryBytes !== null && controllers.includes("memory")) {
    writeFileSync(path.join(dir, "memory.max"), String(limits.maxMemoryBytes));
    tryWrite(path.join(dir, "memory.swap.max"), "0");
    enforces.push("memory");
  }
  return {
    procs: [path.join(dir, "cgroup.procs")],
    enforces,
    oomKilled: async () => /oom_kill [1-9]/.test(await readFile(path.join(dir, "memory.events"), "utf8").catch(() => "")),
    remove: removeDirs([dir]),
  };
}

function makeV1(name: string, limits: WorkerLimits): WorkerCgroup {
  const pids = path.join(ROOT, "pids", name);
  mkdirSync(pids);
  const made = [pids];
  writeFileSync(path.join(pids, "pids.max"), String(limits.maxProcesses));
  const enforces: WorkerCgroup["enforces"] = ["pids"];
  let memory: string | null = null;
  if (limits.maxMemoryBytes !== null && existsSync(path.join(ROOT, "memory"))) {
    memory = path.join(ROOT, "memory", name);
    mkdirSync(memory);
    made.push(memory);
    writeFileSync(path.join(memory, "memory.limit_in_bytes"), String(limits.maxMemoryBytes));
    tryWrite(path.join(memory, "memory.memsw.limit_in_bytes"), String(limits.maxMemoryBytes));
    enforces.push("memory");
  }
  return {
    procs: made.map((d) => path.join(d, "cgroup.procs")),
    enforces,
    // `oom_kill N` in oom_control (memory.failcnt stays 0 when the memsw limit is the one hit).
    oomKilled: async () => (memory ? /oom_kill [1-9]/.test(await readFile(path.join(memory, "memory.oom_control"), "utf8").catch(() => "")) : false),
    remove: removeDirs(made),
  };
}

/**
 * Remove the empty cgroups of providers that are gone (`nimble-<pid>-...` whose pid no
 * longer runs): a provider killed outright cannot remove its workers' own. Returns how many.
 */
export function sweepStaleCgroups(root = ROOT): number {
  let removed = 0;
  const alive = (pid: number) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch (err) {
      return (err as NodeJS.ErrnoException).code === "EPERM";
    }
  };
  for (const dir of [root, path.join(root, "pids"), path.join(root, "memory")]) {
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      continue;
    }
    for (const name of names) {
      const pid = /^nimble-(\d+)-/.exec(name)?.[1];
      if (!pid || Number(pid) === process.pid || alive(Number(pid))) continue;
      try {
        rmdirSync(path.join(dir, name));
        removed++;
      } catch {
        // still holds a process, or not ours to remove
      }
    }
  }
  return removed;
}

/** What a cgroup per worker can enforce here: made and removed once, at a provider's start. */
export async function cgroupSupport(limits: WorkerLimits): Promise<WorkerCgroup["enforces"]> {
  sweepStaleCgroups();
  const probe = makeWorkerCgroup(`nimble-probe-${process.pid}`, { ...limits, maxMemoryBytes: limits.maxMemoryBytes ?? 1 << 30 });
  if (!probe) return [];
  await probe.remove();
  return probe.enforces;
}

/** Resident bytes of `pid` and all its descendants (from /proc; 0 once they are gone). */
export async function treeResidentBytes(pid: number): Promise<number> {
  const parents = new Map<number, number>();
  for (const entry of await readdir("/proc").catch(() => [] as string[])) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = await readFile(`/proc/${entry}/stat`, "utf8").catch(() => "");
    const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
    if (Number.isInteger(ppid)) parents.set(Number(entry), ppid);
  }
  const inTree = (p: number): boolean => {
    for (let at = p, hops = 0; at > 1 && hops < 64; at = parents.get(at) ?? 0, hops++) if (at === pid) return true;
    return false;
  };
  let total = 0;
  for (const p of parents.keys()) {
    if (!inTree(p)) continue;
    const statm = await readFile(`/proc/${p}/statm`, "utf8").catch(() => "");
    total += (Number(statm.split(" ")[1]) || 0) * 4096;
  }
  return total;
}

/**
 * Watch a worker's resident memory every `everyMs`; past `maxBytes`, call `over` once
 * with the fault's text (the caller ends the worker). Returns a function that stops it.
 */
export function watchMemory(pid: number, maxBytes: number, over: (fault: string) => void, everyMs = 500): () => void {
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    const rss = await treeResidentBytes(pid);
    if (stopped) return;
    if (rss > maxBytes) {
      stopped = true;
      return over(memoryFault(maxBytes, rss));
    }
    timer = setTimeout(() => void tick(), everyMs);
  };
  let timer = setTimeout(() => void tick(), everyMs);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

export function memoryFault(maxBytes: number, rss: number | null): string {
  return `went past the owner's memory limit (--max-memory ${formatBytes(maxBytes)}${rss !== null ? `; resident ${formatBytes(rss)}` : ""})`;
}
