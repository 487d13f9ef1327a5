// Builds the native addon (native/shm.c: the buffer a provider shares with its workers,
// src/runtime/sharedBuffer.ts) with node-gyp, at install (`npm install` / `npm ci` run it)
// or by hand (`npm run build:native`). Never fails the install: without a compiler or
// node's headers nimble works as before, every all-reduce carrying its payload over the
// worker link's socket (more memory on the provider), and says so here.
//
// node-gyp fetches node's headers unless told where they are: npm_config_nodedir=/usr (or
// --nodedir) where the distribution ships them (/usr/include/node).
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const strict = process.argv.includes("--strict");
if (process.platform !== "linux") {
  console.error(`nimble: no native addon on ${process.platform}: all-reduces go over the worker link's socket`);
  process.exit(0);
}
// npm runs lifecycle scripts with its own node-gyp; else the one beside npm, or on PATH.
const candidates = [
  process.env.npm_config_node_gyp,
  path.join(path.dirname(process.execPath), "..", "lib", "node_modules", "npm", "node_modules", "node-gyp", "bin", "node-gyp.js"),
].filter((p) => p && existsSync(p));
const [cmd, args] = candidates.length ? [process.execPath, [candidates[0], "rebuild"]] : ["node-gyp", ["rebuild"]];
const env = { ...process.env };
if (!env.npm_config_nodedir && existsSync("/usr/include/node/node_api.h")) env.npm_config_nodedir = "/usr";
const result = spawnSync(cmd, args, { cwd: root, env, stdio: ["ignore", "pipe", "pipe"], encoding: "utf8" });
if (result.status === 0 && existsSync(path.join(root, "build", "Release", "nimble_shm.node"))) {
  console.error("nimble: built the native addon (build/Release/nimble_shm.node)");
  process.exit(0);
}
const tail = `${result.stdout ?? ""}${result.stderr ?? ""}${result.error ? String(result.error) : ""}`.trim().split("\n").slice(-6).join("\n");
console.error(`nimble: could not build the native addon; all-reduces will go over the worker link's socket (more memory on each provider).\n${tail}`);
process.exit(strict ? 1 : 0);
