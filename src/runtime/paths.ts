import { fileURLToPath } from "node:url";
import path from "node:path";
import os from "node:os";

/** Root of the installed nimble package (holds dist/, python-runtime/, node_modules/). */
export const PACKAGE_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const PYTHON_RUNTIME_DIR = path.join(PACKAGE_ROOT, "python-runtime");
export const CLI_PATH = path.join(PACKAGE_ROOT, "dist", "cli.js");

/** Per-user cache root: $NIMBLE_CACHE_DIR, else $XDG_CACHE_HOME/nimble, else ~/.cache/nimble. */
export function cacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.NIMBLE_CACHE_DIR) return path.resolve(env.NIMBLE_CACHE_DIR);
  const xdg = env.XDG_CACHE_HOME || path.join(os.homedir(), ".cache");
  return path.join(xdg, "nimble");
}
