/**
 * Per-job requirements (`requirements:` in the config): resolved once, on the coordinator, into a
 * lock of exact versions and wheel hashes; installed on each provider into a cached folder
 * layered on its base environment (the worker adds it to its module path after the base's own).
 *
 * - Resolution runs pip's resolver against the base environment with every base package pinned as
 *   a constraint, so a job may add packages but never change the base's: no second torch.
 * - Wheels only (`--only-binary :all:`): installing a wheel runs none of its code, whereas building
 *   an sdist would run the package's setup code on the provider, outside the sandbox.
 * - The lock is plain `name==version --hash=sha256:...` lines; a provider accepts nothing else, so
 *   a coordinator cannot pass pip options (an index URL, an editable path) to a provider.
 * - Indexes are each host's own pip/uv configuration (PIP_INDEX_URL, PIP_FIND_LINKS, pip.conf).
 */
import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rename, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { execa } from "execa";
import { z } from "zod";
import { UserError } from "../errors.js";
import { forEachLine } from "./lines.js";
import { cacheDir } from "./paths.js";

export const MAX_LOCK_BYTES = 64 * 1024;
/** An install that takes longer than this is stopped and reported. */
export const INSTALL_TIMEOUT_MS = 15 * 60_000;


const LOCK_LINE = /^([a-z0-9](?:[a-z0-9._-]*[a-z0-9])?)==([A-Za-z0-9.+!_-]{1,64}) --hash=sha256:([0-9a-f]{64})$/;

export interface LockedPackage {
  name: string;
  version: string;
  sha256: string;
}

export interface RequirementsLock {
  /** The lock's text: one `name==version --hash=sha256:HEX` line per package, sorted. */
  lock: string;
  /** sha256 of `lock`: what keys a provider's cached environment. */
  hash: string;
  packages: LockedPackage[];
}

/** PEP 503: names compare lower-cased with runs of `-_.` as one `-`. */
export function normalizeName(name: string): string {
  return name.toLowerCase().replace(/[-_.]+/g, "-");
}

/** The lock's packages, each line checked: anything but `name==version --hash=sha256:HEX` is refused. */
export function parseLock(text: string): LockedPackage[] {
  if (Buffer.byteLength(text) > MAX_LOCK_BYTES) throw new Error(`the requirements lock is over ${MAX_LOCK_BYTES / 1024} KiB`);
  const lines = text.split("\n").filter((l) => l.length > 0);
  if (lines.length === 0) throw new Error("the requirements lock is empty");
  return lines.map((line, i) => {
    const m = LOCK_LINE.exec(line);
    if (!m) throw new Error(`line ${i + 1} of the requirements lock is not \`name==version --hash=sha256:HEX\`: ${JSON.stringify(line.slice(0, 80))}`);
    return { name: m[1], version: m[2], sha256: m[3] };
  });
}

export function lockText(packages: LockedPackage[]): string {
  return [...packages]
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)) // not locale-dependent: the lock's hash must not be
    .map((p) => `${p.name}==${p.version} --hash=sha256:${p.sha256}\n`)
    .join("");
}

export function lockHash(lock: string): string {
  return createHash("sha256").update(lock).digest("hex");
}

const reportSchema = z.object({
  install: z.array(
    z.object({
      metadata: z.object({ name: z.string(), version: z.string() }),
      download_info: z.object({ url: z.string(), archive_info: z.object({ hashes: z.record(z.string()).optional(), hash: z.string().optional() }).optional() }),
    }),
  ),
});

/** The base environment's distributions, name (normalized) -> version. */
export async function basePackages(python: string): Promise<Map<string, string>> {
  const code = "import importlib.metadata as m, json; print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))";
  const result = await execa(python, ["-c", code], { reject: false, timeout: 60_000 });
  if (result.exitCode !== 0) throw new UserError(`Could not list the packages of ${python}: ${String(result.stderr).trim().split("\n").pop()}`);
  const parsed = z.record(z.string()).parse(JSON.parse(String(result.stdout)));
  return new Map(Object.entries(parsed).map(([name, version]) => [normalizeName(name), version]));
}

export interface LockOptions {
  onProgress?: (line: string) => void;
  env?: NodeJS.ProcessEnv;
}

/**
 * Resolve `requirements` against the base environment of `python` into a lock (null for none).
 * Cached by the requirements and the base's packages, so a rerun does not ask the index again.
 */
export async function lockRequirements(requirements: string[], python: string, opts: LockOptions = {}): Promise<RequirementsLock | null> {
  if (requirements.length === 0) return null;
  const progress = opts.onProgress ?? (() => {});
  const base = await basePackages(python);
  const key = lockHash(JSON.stringify({ requirements, python, base: [...base].sort() }));
  const cached = path.join(cacheDir(opts.env), "locks", `${key}.txt`);
  if (existsSync(cached)) {
    const lock = await readFile(cached, "utf8");
    try {
      return { lock, hash: lockHash(lock), packages: parseLock(lock) };
    } catch {
      // a damaged cache entry: resolve again below
    }
  }
  progress(`Resolving ${requirements.length} requirement${requirements.length === 1 ? "" : "s"} against the base environment (torch ${base.get("torch") ?? "absent"})`);
  const dir = await mkdtemp(path.join(os.tmpdir(), "nimble-lock-"));
  try {
    await writeFile(path.join(dir, "requirements.in"), requirements.join("\n") + "\n");
    // Every base package pinned: resolution may add packages, never swap one of the base's.
    await writeFile(path.join(dir, "base.txt"), [...base].map(([n, v]) => `${n}==${v}\n`).join(""));
    const report = path.join(dir, "report.json");
    const args = ["-m", "pip", "install", "--dry-run", "--report", report, "--only-binary", ":all:", "--no-input",
      "--disable-pip-version-check", "--progress-bar", "off", "-c", path.join(dir, "base.txt"), "-r", path.join(dir, "requirements.in")];
    const out = await runLogged(python, args, progress, opts.env);
    if (out.exitCode !== 0) throw resolveError(requirements, out.lines, base);
    const parsed = reportSchema.parse(JSON.parse(await readFile(report, "utf8")));
    const packages = parsed.install.map((item) => {
      const name = normalizeName(item.metadata.name);
      const had = base.get(name);
      if (had !== undefined) {
        throw new UserError(`requirements: installing them would replace ${name} ${had} in the base environment with ${item.metadata.version}`, "A job may add packages, not change the base environment's (there is one torch per provider). Loosen the requirement, or change the base environment (--torch / NIMBLE_TORCH).", 2);
      }
      const info = item.download_info.archive_info;
      const sha256 = info?.hashes?.sha256 ?? (info?.hash?.startsWith("sha256=") ? info.hash.slice(7) : undefined);
      if (!sha256 || !/^[0-9a-f]{64}$/.test(sha256)) throw new UserError(`requirements: ${name} ${item.metadata.version} comes without a sha256 (from ${item.download_info.url})`, undefined, 2);
      return { name, version: item.metadata.version, sha256 };
    });
    if (packages.length === 0) {
      progress("Requirements: the base environment has them all already");
      return null;
    }
    const lock = lockText(packages);
    const locked = parseLock(lock); // versions too odd for a provider to accept fail here, not on every provider
    await mkdir(path.dirname(cached), { recursive: true });
    const part = `${cached}.part-${randomBytes(4).toString("hex")}`;
    await writeFile(part, lock);
    await rename(part, cached); // whole or absent, for a coordinator reading it at the same time
    return { lock, hash: lockHash(lock), packages: locked };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

function resolveError(requirements: string[], lines: string[], base: Map<string, string>): UserError {
  const cause = lines.findIndex((l) => l.includes("The conflict is caused by"));
  const detail = cause >= 0 ? lines.slice(cause, cause + 6).filter((l) => l.trim() && !l.startsWith("To fix")) : lines.filter((l) => l.startsWith("ERROR")).slice(0, 4);
  const text = detail.join("\n") || lines.slice(-4).join("\n");
  // pip names each pinned base package in the conflict as "The user requested (constraint) NAME...".
  const touchesBase = [...new Set([...text.matchAll(/\(constraint\)\s+([A-Za-z0-9._-]+)/g)].map((m) => normalizeName(m[1])))].filter((n) => base.has(n));
  const hint = touchesBase.length > 0
    ? `A job may add packages, not change the base environment's: ${touchesBase.map((n) => `${n} ${base.get(n)}`).join(", ")} stay as they are (one torch per provider).`
    : "Check the names and versions; only wheels are installed (no source builds), from the package index this host's pip is configured with.";
  return new UserError(`requirements (${requirements.join(", ")}) could not be resolved:\n${text}`, hint, 2);
}

async function runLogged(cmd: string, args: string[], progress: (line: string) => void, env?: NodeJS.ProcessEnv, timeout?: number) {
  const child = execa(cmd, args, { all: true, buffer: false, reject: false, env, timeout });
  const lines: string[] = [];
  forEachLine(child.all, (line) => {
    lines.push(line);
    if (lines.length > 200) lines.shift();
    if (line.trim()) progress(`  ${line}`);
  });
  const result = await child;
  return { exitCode: result.timedOut ? -1 : result.exitCode, lines, timedOut: Boolean(result.timedOut) };
}

/** The folder a lock is installed into for `python`: one per lock and base interpreter. */
export function requirementsDir(hash: string, python: string, env: NodeJS.ProcessEnv = process.env): string {
  const slug = createHash("sha256").update(`${hash}\n${python}`).digest("hex").slice(0, 16);
  return path.join(cacheDir(env), "envs", slug);
}

export interface InstallOptions {
  onProgress?: (line: string) => void;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
}

/**
 * Install a lock's wheels (exact versions, hashes checked, no dependencies pulled in beyond the
 * lock) into its cached folder, or find it there. The folder appears whole or not at all: it is
 * filled under a temporary name and renamed, so an interrupted install is redone.
 */
export async function installRequirements(lock: string, python: string, opts: InstallOptions = {}): Promise<{ dir: string; cached: boolean }> {
  const packages = parseLock(lock);
  const hash = lockHash(lock);
  const dir = requirementsDir(hash, python, opts.env);
  if (existsSync(path.join(dir, ".nimble-lock"))) return { dir, cached: true };
  const progress = opts.onProgress ?? (() => {});
  await mkdir(path.dirname(dir), { recursive: true });
  const tmp = `${dir}.part-${randomBytes(4).toString("hex")}`;
  const lockFile = `${tmp}.lock.txt`;
  try {
    await writeFile(lockFile, lock);
    const common = ["--target", tmp, "--no-deps", "--only-binary", ":all:", "--require-hashes", "-r", lockFile];
    const uv = await findUv(python, opts.env);
    progress(`Installing ${packages.length} package${packages.length === 1 ? "" : "s"} with ${uv ? "uv" : "pip"}: ${packages.map((p) => `${p.name} ${p.version}`).join(", ")}`);
    const out = uv
      ? await runLogged(uv[0], [...uv.slice(1), "pip", "install", "--python", python, ...common], progress, opts.env, opts.timeoutMs ?? INSTALL_TIMEOUT_MS)
      : await runLogged(python, ["-m", "pip", "install", "--no-input", "--disable-pip-version-check", "--progress-bar", "off", ...common], progress, opts.env, opts.timeoutMs ?? INSTALL_TIMEOUT_MS);
    if (out.exitCode !== 0) {
      const errorAt = out.lines.findIndex((l) => /error/i.test(l));
      const after = errorAt >= 0 ? out.lines.slice(errorAt).join("\n").toLowerCase() : "";
      const failing = packages.find((p) => after.includes(`${p.name}==${p.version}`.toLowerCase()) || after.includes(`${p.name}-${p.version}`.toLowerCase()));
      const what = failing ? `${failing.name}==${failing.version}` : `${packages.length} package${packages.length === 1 ? "" : "s"}`;
      const tail = out.lines.filter((l) => l.trim()).slice(-4).join("\n");
      throw new Error(out.timedOut ? `installing ${what} took over ${(opts.timeoutMs ?? INSTALL_TIMEOUT_MS) / 60_000} minutes` : `installing ${what} failed: ${tail}`);
    }
    await writeFile(path.join(tmp, ".nimble-lock"), lock);
    try {
      await rename(tmp, dir);
    } catch (err) {
      // Another job installed the same lock meanwhile: keep theirs.
      if (!existsSync(path.join(dir, ".nimble-lock"))) throw err;
    }
    return { dir, cached: false };
  } finally {
    await rm(tmp, { recursive: true, force: true });
    await rm(lockFile, { force: true });
  }
}

/** uv, when the host has it (on PATH, or as a module of the base environment); else pip is used. */
async function findUv(python: string, env?: NodeJS.ProcessEnv): Promise<string[] | null> {
  if ((env ?? process.env).NIMBLE_NO_UV) return null;
  for (const cmd of [["uv"], [python, "-m", "uv"]]) {
    const r = await execa(cmd[0], [...cmd.slice(1), "--version"], { reject: false, timeout: 10_000 }).catch(() => null);
    if (r && r.exitCode === 0) return cmd;
  }
  return null;
}

/** Resolve and install on this host alone (`--dry-run`): the folders to add to the module path. */
export async function localRequirements(requirements: string[], python: string, onProgress: (line: string) => void): Promise<string[]> {
  const lock = await lockRequirements(requirements, python, { onProgress });
  if (!lock) return [];
  try {
    return [(await installRequirements(lock.lock, python, { onProgress })).dir];
  } catch (err) {
    throw new UserError(`requirements: ${err instanceof Error ? err.message : String(err)}`, "Check `requirements:` in the config (names, versions, wheels for this platform) and that pip can reach its package index.");
  }
}
