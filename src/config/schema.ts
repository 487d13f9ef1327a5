/**
 * The job config (`nimble.yaml`): its schema, defaults and output type.
 *
 * Keys are snake_case and exactly these; unknown keys are rejected at every level.
 * Cross-field rules (nesterov needs momentum, warmup_steps < steps, providers xor
 * local_workers) live in `crossFieldIssues` so that they are reported together with
 * the schema's own issues even when some other field is invalid.
 */
import { z } from "zod";
import { KEY_PATTERN } from "../identity/identity.js";
import { dilocoIssues } from "./dilocoRules.js";
import { parallelIssues } from "./parallelRules.js";

export const NAME_PATTERN = /^[A-Za-z0-9._-]{1,64}$/;

/**
 * A PEP 508 requirement by name (extras, version specifiers, markers), not a URL, a path or a pip
 * option: every provider must be able to fetch it from its own index.
 */
export const REQUIREMENT_PATTERN = /^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:\s*\[[A-Za-z0-9._,\s-]*\])?\s*(?:(?:[<>=!~]=?|===)\s*[A-Za-z0-9.*+!_-]+\s*(?:,\s*(?:[<>=!~]=?|===)\s*[A-Za-z0-9.*+!_-]+\s*)*)?(?:;[^@]*)?$/;
export const MAX_REQUIREMENTS = 64;


/** `host:port`, `[v6]:port` or `wss://host:port` (links are TLS: no plain `ws://`). */
export const ADDRESS_PATTERN =
  /^(?:wss:\/\/)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):([0-9]{1,5})\/?$/;

/** YAML writes an empty section (`eval:` with nothing under it) as null: treat it as absent. */
function nullAsAbsent<T extends z.ZodTypeAny>(schema: T) {
  return z.preprocess((v) => (v === null ? undefined : v), schema);
}

/** A discriminated section may leave out its discriminator (`name`, `method`): it then takes `value`. */
function defaultName<T extends z.ZodTypeAny>(value: string, schema: T, key = "name") {
  return z.preprocess((v) => {
    if (v === null) return undefined;
    if (typeof v === "object" && !Array.isArray(v) && !(key in (v as object))) {
      return { [key]: value, ...(v as object) };
    }
    return v;
  }, schema);
}

// Finite everywhere: YAML's .inf and .nan are numbers, and JSON would carry them to the worker as null.
const number = () => z.number().finite();
const positive = number().gt(0);
const nonNegInt = z.number().int().gte(0);
const posInt = z.number().int().gte(1);
const unit = number().gte(0).lt(1);

const sgd = z
  .object({
    name: z.literal("sgd"),
    lr: positive.default(0.01),
    momentum: unit.default(0),
    nesterov: z.boolean().default(false),
    weight_decay: number().gte(0).default(0),
    /** No weight decay on biases and normalisation weights (parameters of fewer than 2 dimensions). */
    no_decay: z.boolean().default(false),
  })
  .strict();

function adamLike<N extends "adam" | "adamw">(name: N, weightDecay: number) {
  return z
    .object({
      name: z.literal(name),
      lr: positive.default(0.001),
      betas: z.tuple([unit, unit]).default([0.9, 0.999]),
      eps: positive.default(1e-8),
      weight_decay: number().gte(0).default(weightDecay),
      no_decay: z.boolean().default(false),
    })
    .strict();
}

export const OPTIMIZER_NAMES = ["sgd", "adam", "adamw"] as const;

export const optimizerSchema = z.discriminatedUnion("name", [
  sgd,
  adamLike("adam", 0),
  adamLike("adamw", 0.01),
]);

export const LR_SCHEDULE_NAMES = ["constant", "linear", "cosine", "warmup_linear", "warmup_cosine"] as const;

/** A decaying schedule: from the peak (after warmup) to min_lr at decay_steps (0: at `steps`), then min_lr. */
function decaying<N extends string>(name: N, warmup: boolean) {
  return z
    .object({
      name: z.literal(name),
      ...(warmup ? { warmup_steps: nonNegInt.default(0) } : {}),
      min_lr: number().gte(0).default(0),
      decay_steps: nonNegInt.default(0),
    })
    .strict();
}

export const lrScheduleSchema = z.discriminatedUnion("name", [
  z.object({ name: z.literal("constant") }).strict(),
  decaying("linear", false),
  decaying("cosine", false),
  decaying("warmup_linear", true),
  decaying("warmup_cosine", true),
]);

export const PRECISIONS = ["fp32", "bf16", "fp16"] as const;

export const COMPRESSION_METHODS = ["none", "fp16", "bf16", "int8", "powersgd", "topk"] as const;

/** Gradient compression: how each step's gradients travel (python-runtime/nimble_worker/compress). */
export const compressionSchema = z.discriminatedUnion("method", [
  z.object({ method: z.literal("none") }).strict(),
  z.object({ method: z.literal("fp16") }).strict(),
  z.object({ method: z.literal("bf16") }).strict(),
  z.object({ method: z.literal("int8") }).strict(),
  z
    .object({
      method: z.literal("powersgd"),
      rank: z.number().int().gte(1).lte(1024).default(4),
      start_step: nonNegInt.default(10),
      min_compression_rate: number().gte(1).default(2),
      error_feedback: z.boolean().default(true),
      warm_start: z.boolean().default(true),
      /** Within what every worker holds exactly (a double's integers; the worker's 64-bit seeds). */
    seed: nonNegInt.lte(Number.MAX_SAFE_INTEGER).default(0),
    })
    .strict(),
  z
    .object({
      method: z.literal("topk"),
      ratio: number().gt(0).lte(1).default(0.01),
      start_step: nonNegInt.default(10),
      error_feedback: z.boolean().default(true),
    })
    .strict(),
]);

export const STRATEGY_NAMES = ["sync"] as const;

/**
 * The training strategy: what one round is and what crosses the network
 * (src/strategy/ on the coordinator, python-runtime/nimble_worker/strategies/ on workers).
 * `sync`: one optimizer step of the global batch per round, its gradient all-reduced
 * through `compression`. `diloco`: H inner steps per worker between syncs of a fragment's
 * pseudo-gradient (README, "DiLoCo"). A new strategy adds its option here, with its own keys.
 */
/** How a DiLoCo pseudo-gradient travels: a wire codec of one all-reduce (lossy ones with error feedback). */
export const DILOCO_CODECS = ["none", "fp16", "bf16", "int8", "int4"] as const;

export const strategySchema = z.discriminatedUnion("name", [
  z
    .object({
      name: z.literal("sync"),
      /**
       * Step t+1's orders go out before step t's reports are in, so workers do not wait one
       * control round trip per step; a worker then applies step t before its decision and
       * keeps a snapshot of its state to undo it (README, "Orders ahead"). auto: on once the
       * round trip is measured above 5% of a step.
       */
      orders_ahead: z.enum(["auto", "on", "off"]).default("auto"),
    })
    .strict(),
  z
    .object({
      name: z.literal("diloco"),
      /** H: inner steps between two syncs of the same fragment. */
      inner_steps: posInt.lte(1_000_000).default(100),
      /** Applied to the global parameters with the averaged pseudo-gradient. */
      outer_optimizer: nullAsAbsent(
        z
          .object({ name: z.literal("sgd").default("sgd"), lr: positive.default(0.7), momentum: unit.default(0.9), nesterov: z.boolean().default(true) })
          .strict()
          .default({}),
      ),
      /** F: the model's top-level modules in F contiguous groups, synced in turn every H / F inner steps. */
      fragments: posInt.lte(4096).default(1),
      /** tau: a fragment's all-reduce starts this many inner steps before its sync, overlapped with them. */
      overlap_steps: nonNegInt.default(0),
      /** After the outer step a fragment's weights are lerp(global, local, alpha). */
      alpha: number().gte(0).lte(1).default(0),
      codec: z.enum(DILOCO_CODECS).default("none"),
    })
    .strict(),
]);

/** How micro-batches flow through the stages: all forwards then all backwards (gpipe), or interleaved (1f1b). */
export const PIPELINE_SCHEDULES = ["gpipe", "1f1b"] as const;
/** How activations and their gradients travel between stages. */
export const ACTIVATION_CODECS = ["none", "fp16", "bf16", "int8"] as const;

/**
 * Pipeline parallelism (`parallel:`): the model's layers in S contiguous stages, each held by
 * workers / S replicas; each step's batch flows through every chain of stages in M
 * micro-batches (src/schedule/stages.ts plans the split). Absent: no pipeline.
 */
export const parallelSchema = z
  .object({
    /** S: stages along the pipeline; the workers must be a multiple of it. */
    pipeline_stages: posInt.lte(4096),
    /** M: micro-batches of each chain's share of a step. */
    micro_batches: posInt.lte(65_536).default(4),
    schedule: z.enum(PIPELINE_SCHEDULES).default("1f1b"),
    activation_codec: z.enum(ACTIVATION_CODECS).default("none"),
  })
  .strict();

/**
 * How the job's all-reduces run: `ring` (2(N-1) hops, each member sends to the next),
 * `direct` (2 hops: every member sends each slice straight to its owner, which sends the
 * sum back to all: src/collective/direct.ts), or `auto`: the coordinator chooses per
 * all-reduce from an alpha-beta cost model of the links it measured in the job
 * (src/job/coordinator/collective.ts).
 */
export const COLLECTIVE_ALGORITHMS = ["auto", "ring", "direct"] as const;
export const collectiveSchema = z.object({ algorithm: z.enum(COLLECTIVE_ALGORITHMS).default("auto") }).strict();

export const providerSchema = z
  .object({
    address: z.string().regex(ADDRESS_PATTERN),
    token: z.string().min(1).optional(),
    /** The provider's identity key: its certificate must carry it (key mode, or both). */
    key: z.string().regex(KEY_PATTERN).optional(),
    /** Not needed at the start: the job runs without it and takes it in when it comes up. */
    optional: z.boolean().default(false),
  })
  .strict();

export const jobConfigSchema = z
  .object({
    name: z.string().regex(NAME_PATTERN),
    task: z.string().min(1),
    task_args: nullAsAbsent(z.record(z.unknown()).default({})),
    steps: posInt,
    batch_size: posInt,
    /** Within what every worker holds exactly (a double's integers; the worker's 64-bit seeds). */
    seed: nonNegInt.lte(Number.MAX_SAFE_INTEGER).default(0),
    optimizer: defaultName("sgd", optimizerSchema.default({ name: "sgd" })),
    lr_schedule: defaultName("constant", lrScheduleSchema.default({ name: "constant" })),
    /** Clip the reduced gradient to this global L2 norm before each update (0: no clipping). */
    grad_clip: number().gte(0).default(0),
    /** Autocast on the worker's device: fp32 (none), bf16, or fp16 with a loss scale every worker agrees on. */
    precision: z.enum(PRECISIONS).default("fp32"),
    /** Steps whose batches a worker's background thread loads ahead (0: each batch when needed); the batches are the same. */
    prefetch: nonNegInt.lte(64).default(2),
    compression: defaultName("powersgd", compressionSchema.default({ method: "powersgd" }), "method"),
    strategy: defaultName("sync", strategySchema.default({ name: "sync" })),
    /** Pipeline parallelism; absent (no pipeline) when not given, so the parsed config has no key. */
    parallel: nullAsAbsent(parallelSchema.optional()),
    /** How all-reduces run: ring, direct, or chosen per all-reduce from the links (auto). */
    collective: nullAsAbsent(collectiveSchema.default({})),
    /** How each step's batch is split: by measured worker speed (default) or equally. */
    balance: z.enum(["measured", "equal"]).default("measured"),
    /**
     * With measured balance: once the first steps are measured, leave out workers whose compute
     * or link would slow every step more than they add (the message says why, with figures).
     */
    leave_out_slow: z.boolean().default(true),
    eval: nullAsAbsent(
      z
        .object({
          every: nonNegInt.default(0),
          samples: posInt.default(1000),
          batch_size: posInt.default(256),
        })
        .strict()
        .default({}),
    ),
    checkpoint: nullAsAbsent(
      z
        .object({
          every: nonNegInt.default(0),
          keep: posInt.default(3),
        })
        .strict()
        .default({}),
    ),
    /** Surviving providers that vanish, hang or crash mid-run. */
    faults: nullAsAbsent(
      z
        .object({
          /** A provider or ring neighbour silent this long (no heartbeat, no data) is lost. */
          heartbeat_s: number().gte(0.5).lte(3600).default(10),
          /** Fewer workers than this left: the job stops with the reason. */
          min_workers: z.number().int().gte(1).lte(4096).default(1),
          /** A provider starts a crashed worker again this many times; then it leaves the job. */
          max_restarts: z.number().int().gte(0).lte(1000).default(3),
          /** Below min_workers, how long to wait for providers to come (back) before stopping. */
          wait_s: number().gte(0).lte(86_400).default(300),
        })
        .strict()
        .default({}),
    ),
    providers: nullAsAbsent(z.array(providerSchema).default([])),
    local_workers: z.number().int().gte(1).lte(64).default(2),
    output: z.string().min(1).default("runs"),
    /** A task folder may hold at most this many MiB (src/job/package.ts). */
    package_limit_mb: posInt.lte(256).default(64),
    /** Pip requirements the task needs beyond the base environment (src/runtime/requirements.ts). */
    requirements: nullAsAbsent(
      z
        .array(
          z
            .string()
            .max(200)
            .regex(REQUIREMENT_PATTERN, "expected a requirement by name such as `tqdm>=4.6` or `rich[jupyter]==13.7.1` (no URLs, paths or pip options: providers install from their own index)"),
        )
        .max(MAX_REQUIREMENTS)
        .default([]),
    ),
  })
  .strict();

/** The validated config with every default filled in. */
export type JobConfig = z.output<typeof jobConfigSchema>;
export type OptimizerConfig = JobConfig["optimizer"];
export type CompressionConfig = JobConfig["compression"];
export type LrScheduleConfig = JobConfig["lr_schedule"];
export type StrategyConfig = JobConfig["strategy"];
export type ParallelConfig = NonNullable<JobConfig["parallel"]>;
export type CollectiveConfig = JobConfig["collective"];
export type ProviderConfig = JobConfig["providers"][number];

export interface RawIssue {
  path: (string | number)[];
  message: string;
  /** It explains the value better than the schema's own issue at the same path, which it replaces. */
  replaces?: boolean;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function isInt(v: unknown): v is number {
  return typeof v === "number" && Number.isInteger(v);
}

/**
 * Rules that span fields, checked on the raw (unvalidated) document. `localWorkers`: the
 * local workers the command starts when it overrides local_workers (`nimble train --local N`).
 */
export function crossFieldIssues(raw: unknown, opts: { localWorkers?: number } = {}): RawIssue[] {
  const issues: RawIssue[] = [];
  if (!isRecord(raw)) return issues;

  const opt = raw.optimizer;
  if (isRecord(opt) && (opt.name === undefined || opt.name === "sgd") && opt.nesterov === true) {
    const m = opt.momentum;
    if (m === undefined || (typeof m === "number" && m <= 0)) {
      issues.push({
        path: ["optimizer", "nesterov"],
        message: `true requires momentum > 0, found momentum ${m === undefined ? "absent (default 0)" : String(m)}`,
      });
    }
  }

  const sched = raw.lr_schedule;
  if (isRecord(sched) && (sched.name === "warmup_cosine" || sched.name === "warmup_linear") && isInt(sched.warmup_steps) && isInt(raw.steps)) {
    const horizon = isInt(sched.decay_steps) && sched.decay_steps > 0 ? sched.decay_steps : raw.steps;
    if (sched.warmup_steps >= horizon) {
      issues.push({
        path: ["lr_schedule", "warmup_steps"],
        message: `expected an integer < ${horizon === raw.steps ? "steps" : "decay_steps"} (${horizon}), found ${sched.warmup_steps}`,
      });
    }
  }

  const collective = raw.collective;
  if (isRecord(collective) && collective.algorithm === "direct" && raw.parallel !== undefined && raw.parallel !== null) {
    issues.push({
      path: ["collective", "algorithm"],
      message: "direct is not available with parallel (pipeline stages all-reduce on their stage rings); use ring or auto",
    });
  }

  issues.push(...dilocoIssues(raw));
  issues.push(...parallelIssues(raw, opts.localWorkers));

  if (Array.isArray(raw.providers) && raw.providers.length > 0 && raw.local_workers !== undefined) {
    issues.push({
      path: ["local_workers"],
      message: `cannot be combined with a non-empty providers list (${raw.providers.length} given); remove one of them`,
    });
  }
  return issues;
}

/** The keys a mapping at `path` may hold, given the raw document (for discriminated sections). */
export function allowedKeysAt(path: (string | number)[], raw: unknown, root: z.ZodTypeAny = jobConfigSchema): string[] | undefined {
  let schema: z.ZodTypeAny = root;
  let value: unknown = raw;
  const steps = [...path];
  for (;;) {
    schema = unwrap(schema);
    if (schema instanceof z.ZodDiscriminatedUnion) {
      const disc = isRecord(value) ? value[schema.discriminator] : undefined;
      const option = schema.optionsMap.get(disc as z.Primitive);
      if (!option) return undefined;
      schema = option;
      continue;
    }
    if (steps.length === 0) break;
    const seg = steps.shift()!;
    if (schema instanceof z.ZodObject) {
      const next = (schema.shape as Record<string, z.ZodTypeAny>)[String(seg)];
      if (!next) return undefined;
      schema = next;
    } else if (schema instanceof z.ZodArray) {
      schema = schema.element;
    } else {
      return undefined;
    }
    value = isRecord(value) || Array.isArray(value) ? (value as Record<string | number, unknown>)[seg] : undefined;
  }
  return schema instanceof z.ZodObject ? Object.keys(schema.shape as object) : undefined;
}

/** The schema of the field at `path` (for "what is allowed" in messages). */
export function schemaAt(path: (string | number)[], raw: unknown, root: z.ZodTypeAny = jobConfigSchema): z.ZodTypeAny | undefined {
  let schema: z.ZodTypeAny = root;
  let value: unknown = raw;
  for (const seg of path) {
    schema = unwrap(schema);
    if (schema instanceof z.ZodDiscriminatedUnion) {
      const disc = isRecord(value) ? value[schema.discriminator] : undefined;
      const option = schema.optionsMap.get(disc as z.Primitive);
      if (!option) return seg === schema.discriminator ? schema : undefined;
      schema = unwrap(option);
    }
    if (schema instanceof z.ZodObject) {
      const next = (schema.shape as Record<string, z.ZodTypeAny>)[String(seg)];
      if (!next) return undefined;
      schema = next;
    } else if (schema instanceof z.ZodArray) {
      schema = schema.element;
    } else if (schema instanceof z.ZodTuple) {
      const items = schema.items as z.ZodTypeAny[];
      const next = typeof seg === "number" ? items[seg] : undefined;
      if (!next) return undefined;
      schema = next;
    } else {
      return undefined;
    }
    value = isRecord(value) || Array.isArray(value) ? (value as Record<string | number, unknown>)[seg] : undefined;
  }
  return unwrap(schema);
}

export function unwrap(schema: z.ZodTypeAny): z.ZodTypeAny {
  for (;;) {
    if (schema instanceof z.ZodDefault) schema = schema._def.innerType;
    else if (schema instanceof z.ZodOptional) schema = schema._def.innerType;
    else if (schema instanceof z.ZodNullable) schema = schema._def.innerType;
    else if (schema instanceof z.ZodEffects) schema = schema._def.schema;
    else return schema;
  }
}

/** A short human description of what a schema accepts: "an integer >= 1", "a number > 0". */
export function describeSchema(schema: z.ZodTypeAny | undefined): string | undefined {
  if (!schema) return undefined;
  schema = unwrap(schema);
  if (schema instanceof z.ZodNumber) {
    const checks = schema._def.checks;
    const isInteger = checks.some((c) => c.kind === "int");
    const parts: string[] = [];
    for (const c of checks) {
      if (c.kind === "min") parts.push(`${c.inclusive ? ">=" : ">"} ${c.value}`);
      if (c.kind === "max") parts.push(`${c.inclusive ? "<=" : "<"} ${c.value}`);
    }
    return `${isInteger ? "an integer" : "a number"}${parts.length ? " " + parts.join(" and ") : ""}`;
  }
  if (schema instanceof z.ZodString) {
    const regex = schema._def.checks.find((c) => c.kind === "regex");
    if (regex && regex.kind === "regex") {
      if (regex.regex === NAME_PATTERN) return "1 to 64 characters from A-Z a-z 0-9 . _ -";
      if (regex.regex === ADDRESS_PATTERN) return "host:port or wss://host:port";
      if (regex.regex === KEY_PATTERN) return "a nimble key, ed25519:<43 characters> (`nimble id` prints it)";
    }
    return "a non-empty string";
  }
  if (schema instanceof z.ZodBoolean) return "true or false";
  if (schema instanceof z.ZodLiteral) return JSON.stringify(schema.value);
  if (schema instanceof z.ZodDiscriminatedUnion) {
    // What a whole section takes (its discriminator alone is described by the loader).
    const options = [...schema.optionsMap.keys()].map(String);
    const key = schema.discriminator;
    return `a mapping with ${key}: one of ${options.join(" | ")} (e.g. {${key}: ${options[0]}})`;
  }
  if (schema instanceof z.ZodTuple) {
    const items = schema.items as z.ZodTypeAny[];
    return `a list of ${items.length} items, each ${describeSchema(items[0]) ?? "a value"}`;
  }
  if (schema instanceof z.ZodArray) return "a list";
  if (schema instanceof z.ZodRecord || schema instanceof z.ZodObject) return "a mapping";
  return undefined;
}
