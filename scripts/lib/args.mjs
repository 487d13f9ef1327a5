// What every benchmark script needs first: where the repository and the built CLI are, and
// its `--name value` options.
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const CLI = path.join(ROOT, "dist", "cli.js");

const argv = process.argv.slice(2);

/** The value after `--name`, or `fallback` when the option is not given. */
export function arg(name, fallback) {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : fallback;
}

/** Whether `--name` is given. */
export function flag(name) {
  return argv.includes(`--${name}`);
}

/** A comma-separated option as a list. */
export function list(name, fallback) {
  return arg(name, fallback).split(",").map((s) => s.trim()).filter(Boolean);
}
