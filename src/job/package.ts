/**
 * Task packages: a `task:` that names a folder ships the folder. Its `task.py` is the entry
 * point, sibling modules import, and files beside it (data, tokenizers) are found relative
 * to `__file__`. The package is built deterministically (files in path order, ignore rules
 * from a `.nimbleignore` and a few defaults, a size limit) into one blob whose sha256 names
 * it: providers cache it by that hash and receive it in chunks after authentication.
 *
 * Blob: a 4-byte little-endian manifest length, the manifest (JSON `[{path, size}]`), then
 * the files' bytes in manifest order.
 */
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { lstat, mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { ConfigError } from "../errors.js";

export const DEFAULT_PACKAGE_LIMIT_BYTES = 64 * 1024 * 1024;
export const PACKAGE_ENTRY = "task.py";
/** One chunk of a package on the control link. */
export const PACKAGE_CHUNK_BYTES = 1024 * 1024;
const MAX_FILES = 10_000;
const MAX_DEPTH = 16;
/** Path segments a package may hold (what providers accept, on every file system). */
const SEGMENT = /^[A-Za-z0-9._-]{1,128}$/;
/** Left out unless a .nimbleignore says otherwise: caches, checkouts, environments, runs. */
const DEFAULT_IGNORES = [".git/", "__pycache__/", "*.pyc", ".venv/", "venv/", "node_modules/", "runs/", ".ipynb_checkpoints/", ".DS_Store"];

export interface PackageFile {
  path: string;
  size: number;
}

export interface TaskPackage {
  /** sha256 of the blob (hex). */
  hash: string;
  entry: string;
  files: PackageFile[];
  blob: Buffer;
}

/** `.nimbleignore` rules: `name/` a folder anywhere, `*.ext` and other globs on names, `/path` from the top. */
function ignoreRule(rule: string): (rel: string, isDir: boolean) => boolean {
  const anchored = rule.startsWith("/");
  const dirOnly = rule.endsWith("/");
  const body = rule.replace(/^\//, "").replace(/\/$/, "");
  const re = new RegExp(`^${body.split("*").map((p) => p.replace(/[.+?^${}()|[\]\\]/g, "\\$&")).join("[^/]*")}$`);
  return (rel, isDir) => {
    if (dirOnly && !isDir) return false;
    if (anchored) return re.test(rel);
    return re.test(path.posix.basename(rel)) || re.test(rel);
  };
}

/** Build the package of folder `dir` (which must hold task.py), within `limit` bytes. */
export async function buildPackage(dir: string, limit = DEFAULT_PACKAGE_LIMIT_BYTES): Promise<TaskPackage> {
  const root = path.resolve(dir);
  const ignoreFile = path.join(root, ".nimbleignore");
  const extra = existsSync(ignoreFile) ? (await readFile(ignoreFile, "utf8")).split("\n").map((l) => l.trim()).filter((l) => l && !l.startsWith("#")) : [];
  const rules = [...DEFAULT_IGNORES, ".nimbleignore", ...extra].map(ignoreRule);
  const files: { rel: string; abs: string; size: number }[] = [];
  let total = 0;
  const walk = async (absDir: string, relDir: string, depth: number) => {
    if (depth > MAX_DEPTH) throw new ConfigError(`task folder ${root}: ${relDir} is nested deeper than ${MAX_DEPTH} folders`);
    for (const name of (await readdir(absDir)).sort()) {
      const rel = relDir ? `${relDir}/${name}` : name;
      const abs = path.join(absDir, name);
      const info = await lstat(abs);
      if (rules.some((r) => r(rel, info.isDirectory()))) continue;
      if (!SEGMENT.test(name)) throw new ConfigError(`task folder ${root}: ${JSON.stringify(rel)} has a name providers refuse (1 to 128 characters from A-Z a-z 0-9 . _ -)`, "Rename it, or list it in a .nimbleignore.");
      if (info.isSymbolicLink()) throw new ConfigError(`task folder ${root}: ${rel} is a symbolic link`, "Packages hold plain files: copy what it points to, or list it in a .nimbleignore.");
      if (info.isDirectory()) await walk(abs, rel, depth + 1);
      else if (info.isFile()) {
        total += info.size;
        if (total > limit) throw new ConfigError(`task folder ${root} holds more than the package limit of ${(limit / 2 ** 20).toFixed(0)} MiB (at ${rel})`, "Leave large data out with a .nimbleignore (providers can read it from task_args paths), or raise package_limit_mb.");
        files.push({ rel, abs, size: info.size });
        if (files.length > MAX_FILES) throw new ConfigError(`task folder ${root} holds more than ${MAX_FILES} files`, "Leave some out with a .nimbleignore.");
      }
    }
  };
  await walk(root, "", 0);
  if (!files.some((f) => f.rel === PACKAGE_ENTRY)) throw new ConfigError(`task folder ${root} has no ${PACKAGE_ENTRY}`, "A task folder's entry point is its task.py (build_model, build_dataset, ...).");
  const manifest = Buffer.from(JSON.stringify(files.map((f) => ({ path: f.rel, size: f.size }))));
  const head = Buffer.alloc(4);
  head.writeUInt32LE(manifest.length);
  const blob = Buffer.concat([head, manifest, ...(await Promise.all(files.map((f) => readFile(f.abs))))]);
  return { hash: createHash("sha256").update(blob).digest("hex"), entry: PACKAGE_ENTRY, files: files.map((f) => ({ path: f.rel, size: f.size })), blob };
}

/** The files of a package blob, each checked: relative names of allowed segments, sizes that add up. */
export function readPackage(blob: Buffer): { files: PackageFile[]; data: (i: number) => Buffer } {
  if (blob.length < 4) throw new Error("package is shorter than its header");
  const length = blob.readUInt32LE(0);
  if (length > blob.length - 4 || length > 8 * 1024 * 1024) throw new Error(`package manifest of ${length} bytes does not fit`);
  let manifest: unknown;
  try {
    manifest = JSON.parse(blob.subarray(4, 4 + length).toString("utf8"));
  } catch {
    throw new Error("package manifest is not JSON");
  }
  if (!Array.isArray(manifest) || manifest.length > MAX_FILES) throw new Error("package manifest is not a list of files");
  const offsets: number[] = [];
  let at = 4 + length;
  const files = manifest.map((f: unknown, i) => {
    const { path: p, size } = (f ?? {}) as { path?: unknown; size?: unknown };
    if (typeof p !== "string" || !p.split("/").every((s) => SEGMENT.test(s) && s !== "." && s !== "..") || p.split("/").length > MAX_DEPTH + 1) throw new Error(`package file ${i} has a name providers refuse: ${JSON.stringify(String(p).slice(0, 100))}`);
    if (!Number.isInteger(size) || (size as number) < 0) throw new Error(`package file ${p} has no size`);
    offsets.push(at);
    at += size as number;
    return { path: p, size: size as number };
  });
  if (at !== blob.length) throw new Error(`package files add up to ${at - 4 - length} bytes, the package holds ${blob.length - 4 - length}`);
  return { files, data: (i) => blob.subarray(offsets[i]!, offsets[i]! + files[i]!.size) };
}

/** Unpack a blob whose hash was checked into `dir` (made whole in a temporary folder, then renamed). */
export async function unpackPackage(blob: Buffer, dir: string): Promise<void> {
  const { files, data } = readPackage(blob);
  const tmp = `${dir}.${process.pid}.tmp`;
  await rm(tmp, { recursive: true, force: true });
  for (const [i, f] of files.entries()) {
    const file = path.join(tmp, ...f.path.split("/"));
    await mkdir(path.dirname(file), { recursive: true });
    await writeFile(file, data(i));
  }
  await mkdir(path.dirname(dir), { recursive: true });
  try {
    await rename(tmp, dir);
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    if (!existsSync(dir)) throw err; // another job unpacked the same package meanwhile: fine
  }
}
