/**
 * `nimble export RUN --to DIR`: a run's final weights for use elsewhere. `model.safetensors`
 * as the worker wrote it (metadata `format: pt`, tied weights once: transformers and
 * safetensors.torch load it), and a `config.json` naming what made it: the job config, the
 * task (file name and sha256, or the package's hash), the steps trained and the final figures.
 */
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { copyFile, mkdir, readdir, readFile, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { parse as parseYaml } from "yaml";
import { UserError } from "../errors.js";
import { buildPackage } from "../job/package.js";
import type { RunData } from "./runData.js";

export interface Exported {
  dir: string;
  files: string[];
  config: Record<string, unknown>;
}

/** sha256 of the run's copy of its task: the file, or the package built from its folder copy. */
async function taskIdentity(runDir: string, task: string): Promise<{ task: string; sha256: string; package: boolean }> {
  const copy = path.join(runDir, path.basename(task));
  if (!existsSync(copy)) throw new UserError(`${runDir} has no copy of its task (${path.basename(task)})`);
  if ((await stat(copy)).isDirectory()) return { task: path.basename(task), sha256: (await buildPackage(copy)).hash, package: true };
  return { task: path.basename(task), sha256: createHash("sha256").update(await readFile(copy)).digest("hex"), package: false };
}

export async function exportRun(run: RunData, to: string): Promise<Exported> {
  const weights = path.join(run.dir, "model.safetensors");
  if (!existsSync(weights)) throw new UserError(`${run.dir} has no final weights (model.safetensors)`, "Only a run that completed, or was cancelled after its first step, has them.");
  const dir = path.resolve(to);
  if (existsSync(dir) && (await readdir(dir)).some((f) => f === "model.safetensors" || f === "config.json")) {
    throw new UserError(`${dir} already holds an export (model.safetensors or config.json): nothing was written`, "Export into a new or empty folder.");
  }
  const jobConfig = parseYaml(await readFile(path.join(run.dir, "config.yaml"), "utf8")) as Record<string, unknown>;
  const summary = (run.summary ?? {}) as Record<string, unknown>;
  const config = {
    format: "nimble-export-1",
    name: jobConfig.name,
    task: await taskIdentity(run.dir, String(jobConfig.task ?? "task.py")),
    steps: summary.steps ?? null,
    status: summary.status ?? null,
    final_loss: summary.final_loss ?? null,
    eval: summary.eval ?? null,
    run_dir: run.dir,
    job_config: jobConfig,
  };
  await mkdir(dir, { recursive: true });
  await copyFile(weights, path.join(dir, "model.safetensors"));
  await writeFile(path.join(dir, "config.json"), JSON.stringify(config, null, 2) + "\n");
  return { dir, files: ["model.safetensors", "config.json"].map((f) => path.join(dir, f)), config };
}
