/**
 * Reading run directories back: what `nimble runs` lists and `nimble report` charts.
 * A run killed mid-way has no summary.json; what its metrics.jsonl holds is still shown.
 */
import { readdir, readFile, stat } from "node:fs/promises";
import path from "node:path";
import { UserError } from "../errors.js";
import type { TrainSummary } from "../job/coordinator/index.js";
import type { StepMetrics } from "../job/runDir.js";
import { parseMetricsLines } from "../job/metricsFile.js";
import { firstProblem, summarySchema } from "./schemas.js";

/** completed, failed, cancelled: from summary.json; incomplete: no summary (still running, or killed). */
export type RunStatus = TrainSummary["status"] | "incomplete";

export interface RunData {
  /** Absolute path of the run directory. */
  dir: string;
  /** The job name (summary, else config.yaml's `name`, else the folder name). */
  name: string;
  status: RunStatus;
  /** summary.json, when the run got far enough to write it. */
  summary: TrainSummary | null;
  /**
   * metrics.jsonl, one entry per completed step, in step order (lines cut short by a crash
   * dropped). Empty when loaded for a listing from a summary that has every figure.
   */
  metrics: StepMetrics[];
  /** Steps of the checkpoints on disk, ascending. */
  checkpoints: number[];
  /** When the run started (summary's started_at, else the folder's creation time). */
  startedAt: Date;
  /** Last change to metrics.jsonl or summary.json. */
  updatedAt: Date;
  /** Path of the run's log file, when it has one. */
  logFile: string | null;
  /** What was wrong with its files (damaged or edited), each naming the file and field. */
  problems: string[];
}

/** Key figures of a run, from the summary or, for an incomplete run, from its metrics. */
export interface RunFigures {
  steps: number;
  samples: number;
  wall_s: number | null;
  /** Samples per second of training (time in steps; start-up left out). */
  samples_per_s: number | null;
  final_loss: number | null;
  eval: Record<string, number> | null;
  bytes_sent: number;
  compression_ratio: number | null;
  workers: number;
  faults: number;
}

async function readText(file: string): Promise<string | null> {
  try {
    return await readFile(file, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw err;
  }
}

async function mtime(file: string): Promise<Date | null> {
  try {
    return (await stat(file)).mtime;
  } catch {
    return null;
  }
}

/** The steps of metrics.jsonl; `problems` gets one entry per damaged line. */
export function parseMetrics(text: string, problems: string[] = []): StepMetrics[] {
  const { metrics, damaged } = parseMetricsLines(text);
  for (const d of damaged) problems.push(`metrics.jsonl line ${d.line}: ${d.why}`);
  return metrics;
}

const RUN_FILES = ["summary.json", "metrics.jsonl", "config.yaml"];

/**
 * Read one run directory; a UserError names the folder when it is not one. `forListing`
 * skips metrics.jsonl (megabytes on a long run) when the summary has every figure a list shows.
 */
export async function loadRun(dirArg: string, options: { forListing?: boolean } = {}): Promise<RunData> {
  const dir = path.resolve(dirArg);
  const info = await stat(dir).catch(() => null);
  if (!info?.isDirectory()) throw new UserError(`${dirArg} is not a folder`, "Pass a run directory, e.g. runs/mnist-cnn-20261126-101500 (`nimble runs` lists them).", 2);
  const problems: string[] = [];
  // A file that cannot be read (a folder, no permission) is a problem of the run, not a crash.
  const readOrNote = (f: string) =>
    readText(path.join(dir, f)).catch((err: NodeJS.ErrnoException) => {
      problems.push(`${f}: cannot be read (${err.code === "EISDIR" ? "it is a folder" : err.code ?? err.message})`);
      return null;
    });
  const [summaryText, configText] = await Promise.all(["summary.json", "config.yaml"].map(readOrNote));
  const metricsFile = path.join(dir, "metrics.jsonl");
  const [metricsTime, summaryTime, logTime] = await Promise.all([metricsFile, path.join(dir, "summary.json"), path.join(dir, "train.log")].map(mtime));
  if (summaryText === null && metricsTime === null && configText === null) {
    throw new UserError(`${dirArg} is not a run directory (no summary.json, metrics.jsonl or config.yaml in it)`, "Pass a folder that `nimble train` created; `nimble runs` lists them.", 2);
  }
  let summary: TrainSummary | null = null;
  if (summaryText !== null) {
    // Treated as a run without a summary when damaged; the problem says what is wrong.
    try {
      const parsed = summarySchema.safeParse(JSON.parse(summaryText));
      if (parsed.success) summary = parsed.data as unknown as TrainSummary;
      else problems.push(`summary.json: ${firstProblem(parsed.error)}`);
    } catch {
      problems.push("summary.json: not JSON");
    }
  }
  const configName = configText ? /^name:\s*["']?([^"'#\n]+?)["']?\s*(#.*)?$/m.exec(configText)?.[1] : undefined;
  let checkpoints: number[] = [];
  try {
    checkpoints = (await readdir(path.join(dir, "checkpoints")))
      .filter((n) => /^step-\d+$/.test(n))
      .map((n) => Number(n.slice(5)))
      .sort((a, b) => a - b);
  } catch {
    // No checkpoints folder.
  }
  const times = [metricsTime, summaryTime].filter((d): d is Date => d !== null);
  // Summaries from before samples_per_s existed need the metrics for it.
  const readMetrics = metricsTime !== null && (!options.forListing || summary?.samples_per_s === undefined);
  return {
    dir,
    name: summary?.name ?? configName ?? path.basename(dir),
    status: summary?.status ?? "incomplete",
    summary,
    metrics: readMetrics ? parseMetrics((await readOrNote("metrics.jsonl")) ?? "", problems) : [],
    checkpoints,
    startedAt: summary?.started_at && !Number.isNaN(Date.parse(summary.started_at)) ? new Date(summary.started_at) : info.birthtime.getTime() > 0 ? info.birthtime : info.mtime,
    updatedAt: times.length > 0 ? new Date(Math.max(...times.map((d) => d.getTime()))) : info.mtime,
    logFile: logTime ? path.join(dir, "train.log") : null,
    problems,
  };
}

export function runFigures(run: RunData): RunFigures {
  const s = run.summary;
  const last = run.metrics.at(-1);
  const lastEval = [...run.metrics].reverse().find((m) => m.eval)?.eval ?? null;
  const sent = run.metrics.reduce((a, m) => a + m.bytes_sent, 0);
  const uncompressed = run.metrics.reduce((a, m) => a + m.uncompressed_bytes, 0);
  const stepSeconds = run.metrics.reduce((a, m) => a + m.step_s, 0);
  const metricsSamples = run.metrics.reduce((a, m) => a + m.samples, 0);
  const finalLoss = [...run.metrics].reverse().find((m) => m.loss !== null)?.loss ?? null;
  return {
    steps: s?.steps ?? (last ? last.step + 1 : 0),
    samples: s?.samples ?? metricsSamples,
    wall_s: s?.wall_s ?? last?.wall_s ?? null,
    // Older summaries lack samples_per_s: the metrics give the same figure.
    samples_per_s: s?.samples_per_s ?? (stepSeconds > 0 ? metricsSamples / stepSeconds : null),
    final_loss: s ? s.final_loss : finalLoss,
    eval: s ? s.eval : lastEval,
    bytes_sent: s?.bytes_sent ?? sent,
    compression_ratio: s ? s.compression_ratio : sent > 0 ? uncompressed / sent : null,
    workers: s?.workers.length ?? new Set(run.metrics.flatMap((m) => m.workers.map((w) => w.rank))).size,
    faults: s?.faults.length ?? 0,
  };
}

/** Every run directory directly under `outputRoot`, oldest first. Folders that are not runs are passed over. */
export async function listRuns(outputRoot: string): Promise<RunData[]> {
  let names: string[];
  try {
    names = (await readdir(outputRoot, { withFileTypes: true })).filter((d) => d.isDirectory()).map((d) => d.name);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw err;
  }
  const runs = await Promise.all(names.map((n) => loadRun(path.join(outputRoot, n), { forListing: true }).catch(() => null)));
  return runs.filter((r): r is RunData => r !== null).sort((a, b) => a.startedAt.getTime() - b.startedAt.getTime() || a.dir.localeCompare(b.dir));
}

/**
 * A run named on the command line: a path to its folder, or a folder name (or unique
 * prefix of one) under the output folder.
 */
export async function resolveRun(arg: string, outputRoot: string): Promise<string> {
  const asPath = await stat(arg).catch(() => null);
  if (asPath?.isDirectory()) return path.resolve(arg);
  // By folder name only: nothing in the runs needs reading to pick one.
  const names = (await readdir(outputRoot, { withFileTypes: true }).catch(() => [])).filter((d) => d.isDirectory()).map((d) => d.name);
  const isRun = async (name: string) => (await Promise.all(RUN_FILES.map((f) => mtime(path.join(outputRoot, name, f))))).some((t) => t !== null);
  if (names.includes(arg) && (await isRun(arg))) return path.join(path.resolve(outputRoot), arg);
  const matches: string[] = [];
  for (const name of names.filter((n) => n.startsWith(arg)).sort()) if (await isRun(name)) matches.push(name);
  if (matches.length === 1) return path.join(path.resolve(outputRoot), matches[0]!);
  if (matches.length > 1) {
    throw new UserError(`${arg} matches ${matches.length} runs in ${outputRoot}: ${matches.join(", ")}`, "Give more of the name.", 2);
  }
  throw new UserError(`No run ${arg} (not a folder, and no run of that name in ${outputRoot})`, "`nimble runs` lists the runs; pass --output if they are in another folder.", 2);
}
