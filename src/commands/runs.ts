import path from "node:path";
import { formatRunDetail, formatRunList, runListing } from "../runs/format.js";
import { exportRun } from "../runs/export.js";
import { listRuns, loadRun, resolveRun } from "../runs/runData.js";

export interface RunsCommandOptions {
  /** The output folder runs are written to (config field `output`). Default "runs". */
  output?: string;
  json?: boolean;
}

/** `nimble runs`: the runs in the output folder with their key figures. */
export async function runsCommand(options: RunsCommandOptions): Promise<void> {
  const root = path.resolve(options.output ?? "runs");
  const runs = await listRuns(root);
  if (options.json) process.stdout.write(JSON.stringify(runs.map(runListing)) + "\n");
  else process.stdout.write(formatRunList(runs, root).join("\n") + "\n");
}

/** `nimble runs show RUN`: one run's summary. RUN is a path, or a run's folder name (or prefix). */
export async function runsShowCommand(runArg: string, options: RunsCommandOptions): Promise<void> {
  const run = await loadRun(await resolveRun(runArg, path.resolve(options.output ?? "runs")));
  for (const p of run.problems) process.stderr.write(`warning: ${run.dir}: ${p}\n`);
  if (options.json) process.stdout.write(JSON.stringify({ ...runListing(run), summary: run.summary, log_file: run.logFile }) + "\n");
  else process.stdout.write(formatRunDetail(run).join("\n") + "\n");
}

/** `nimble export RUN --to DIR`: the run's final weights and a config.json naming what made them. */
export async function exportCommand(runArg: string, options: RunsCommandOptions & { to: string }): Promise<void> {
  const out = await exportRun(await loadRun(await resolveRun(runArg, path.resolve(options.output ?? "runs"))), options.to);
  if (options.json) process.stdout.write(JSON.stringify({ dir: out.dir, files: out.files, config: out.config }) + "\n");
  else process.stdout.write(`${out.files.map((f) => `wrote ${f}`).join("\n")}\n`);
}
