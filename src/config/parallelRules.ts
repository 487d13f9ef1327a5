/**
 * Pipeline parallelism's config rules (`parallel:`), checked on the raw document with the
 * schema's own issues; `checkPipelineWorkers` repeats the ones that need the number of
 * workers once it is known (a providers list is only counted when the job starts).
 */
import { ConfigError } from "../errors.js";
import type { JobConfig, RawIssue } from "./schema.js";

const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);
const isInt = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v);

/** The schema's defaults, for rules checked before the defaults are filled in. */
const DEFAULT_LOCAL_WORKERS = 2;
const DEFAULT_MICRO_BATCHES = 4;
/** Codecs that can carry a stage's gradient (no state of the whole model's gradient). */
const STAGE_CODECS = "none | fp16 | bf16 | int8";

/** `parallel`'s rules between its keys and the job's; `localWorkers` overrides local_workers (`--local N`). */
export function parallelIssues(raw: Record<string, unknown>, localWorkers?: number): RawIssue[] {
  const p = raw.parallel;
  if (!isRecord(p)) return []; // absent (no pipeline), or not a mapping: the schema reports it
  const issues: RawIssue[] = [];
  if (isRecord(raw.strategy) && raw.strategy.name === "diloco") {
    issues.push({ path: ["parallel"], message: "pipeline with diloco is not supported yet: remove parallel, or use strategy sync" });
  }
  const c = raw.compression;
  const method = isRecord(c) ? (c.method === undefined ? "powersgd" : c.method) : undefined;
  if (method === "powersgd" || method === "topk") {
    const state = method === "powersgd" ? "low-rank factors and error feedback" : "error feedback";
    issues.push({
      path: isRecord(c) && c.method !== undefined ? ["compression", "method"] : ["compression"],
      message:
        `${method} cannot be used with parallel: a stage's gradient is reduced per stage, among that stage's replicas only, ` +
        `and ${method} keeps ${state} of the whole model's gradient; expected one of ${STAGE_CODECS} (under parallel it defaults to none)`,
    });
  }
  // The workers are known here only without a providers list: local_workers (or its default).
  if (!(Array.isArray(raw.providers) && raw.providers.length > 0)) {
    const given = raw.local_workers !== undefined;
    const workers = localWorkers ?? (given ? raw.local_workers : DEFAULT_LOCAL_WORKERS);
    const what = localWorkers !== undefined ? `--local ${localWorkers}` : given ? `local_workers ${workers}` : `local_workers, ${workers} by default`;
    if (isInt(workers) && workers >= 1) issues.push(...pipelineWorkerIssues(p, raw.batch_size, workers, what));
  }
  return issues;
}

/**
 * The rules that need the number of workers: S divides it (every stage has the same number
 * of replicas, D = workers / S), and each of the D chains gets at least M samples a step.
 * `what` says where the count came from, for the message.
 */
export function pipelineWorkerIssues(parallel: Record<string, unknown>, batchSize: unknown, workers: number, what: string): RawIssue[] {
  const s = parallel.pipeline_stages;
  if (!isInt(s) || s < 1) return []; // the schema reports it
  if (workers % s !== 0) {
    const divisors = [];
    for (let d = 1; d <= workers; d++) if (workers % d === 0) divisors.push(d);
    return [
      {
        path: ["parallel", "pipeline_stages"],
        message: `${s} does not divide the ${workers} workers (${what}): every stage needs the same number of replicas; expected a divisor of ${workers} (${divisors.join(", ")})`,
      },
    ];
  }
  const given = parallel.micro_batches !== undefined;
  const m = given ? parallel.micro_batches : DEFAULT_MICRO_BATCHES;
  const d = workers / s;
  if (isInt(m) && m >= 1 && isInt(batchSize) && batchSize >= 1 && m * d > batchSize) {
    const most = Math.floor(batchSize / d);
    return [
      {
        path: ["parallel", "micro_batches"],
        message:
          `expected at most batch_size / (workers / pipeline_stages) = ${batchSize} / (${workers} / ${s}) = ${most}: ` +
          `${d === 1 ? "the one chain gets" : `each of the ${d} chains gets ${batchSize % d === 0 ? "" : "about "}`}${most} sample${most === 1 ? "" : "s"} a step and needs at least one per micro-batch, found ${m}${given ? "" : " (the default)"}`,
      },
    ];
  }
  return [];
}

/**
 * For the coordinator once the providers are known: throws a ConfigError (exit 2) naming
 * `parallel.pipeline_stages` (or `parallel.micro_batches`) and the numbers when `workers`
 * cannot run the config's pipeline. No `parallel`: nothing to check.
 */
export function checkPipelineWorkers(config: Pick<JobConfig, "parallel" | "batch_size">, workers: number): void {
  if (!config.parallel) return;
  const issues = pipelineWorkerIssues(config.parallel, config.batch_size, workers, "counted when the job started");
  if (issues.length === 0) return;
  throw new ConfigError(
    issues.map((i) => `${i.path.join(".")}: ${i.message}`).join("\n"),
    "Set parallel.pipeline_stages (and parallel.micro_batches) to fit the workers, or change the providers.",
  );
}

/**
 * Under `parallel` the gradient codec defaults to none (the job default, powersgd, cannot
 * carry a stage's gradient); an explicit `compression` is kept (and checked above).
 */
export function withParallelDefaults<C extends Pick<JobConfig, "parallel" | "compression">>(config: C, raw: unknown): C {
  if (!config.parallel || (isRecord(raw) && raw.compression !== undefined && raw.compression !== null)) return config;
  return { ...config, compression: { method: "none" } };
}
