import { decode, encode } from "@msgpack/msgpack";
import { z } from "zod";
import { ProtocolError } from "../errors.js";
import { credentialSchema, keySchema, proofFields } from "./proofs.js";

/**
 * Control plane: coordinator <-> provider, one msgpack map per binary WebSocket message,
 * validated here before anything acts on it.
 */
/**
 * 2: explicit round decisions. 3: worker orders and reports travel in `order` / `report`
 * envelopes that providers pass on without reading (src/protocol/workerOps.ts).
 * 4: TLS links; identities and session-bound proofs instead of tokens and secrets.
 * 5: orders ahead (two live attempts, quiet decisions), the direct all-reduce's pair
 * links and per-round choice, warm spares' `started`.
 */
export const PROTOCOL_VERSION = 5;
/** The largest task package a provider takes (its chunks travel one MiB at a time). */
export const MAX_PACKAGE_BYTES = 256 * 1024 * 1024;
/** Control messages carry the task file and checkpoints; bound them all the same. */
export const MAX_CONTROL_BYTES = 512 * 1024 * 1024;
/**
 * A report's payload larger than this goes in pieces of at most this size (`report_part`),
 * each sent once the link has taken the one before: neither side holds the payload more
 * than once, nor its encoding or its encryption whole.
 */
export const REPORT_PART_BYTES = 8 * 1024 * 1024;

const finite = z.number().finite();
const count = z.number().int().min(0);
const bytes = z.custom<Uint8Array>((value) => value instanceof Uint8Array, "expected binary data");
const ringMember = z.object({ rank: count, url: z.string().max(1024), key: keySchema });
/** A group of ranks with links of its own (src/collective/groups.ts): a stage's ring, or a pipe. */
export const groupSpecSchema = z.object({
  id: z.string().regex(/^[a-z0-9:_-]{1,64}$/),
  kind: z.enum(["ring", "pipe"]),
  members: z.array(count).min(1).max(4096),
});
/** Pipeline parallelism's layout, as providers need it: each rank's stage, the layers of each, the groups. */
export const pipelineSpecSchema = z.object({
  stages: z.number().int().min(1).max(4096),
  /** Top-level layer index where each stage starts, and the end (stages + 1 numbers); null: the task's build_stages. */
  bounds: z.array(count).max(4097).nullable(),
  /** The stage of every rank the job has had. */
  stage_of: z.array(count).max(4096),
  groups: z.array(groupSpecSchema).max(16384),
});
export type PipelineSpec = z.infer<typeof pipelineSpecSchema>;

/** How a round's all-reduces are run (the coordinator's choice, src/job/coordinator/collective.ts). */
export const collectiveChoiceSchema = z.object({ direct_max_bytes: count.nullable() });
export type CollectiveChoice = z.infer<typeof collectiveChoiceSchema>;

/** One all-reduce a provider ran for a rank: how, its wire bytes (the buffer's, in its codec), and its seconds. */
export const collectiveTimingSchema = z.object({ algorithm: z.enum(["ring", "direct"]), bytes: count, seconds: z.number().finite().nonnegative() });
export type CollectiveTiming = z.infer<typeof collectiveTimingSchema>;

export const deviceSchema = z.object({
  id: z.string().max(64),
  kind: z.string().max(32),
  name: z.string().max(256),
  memory_bytes: count.optional(),
  cores: count.optional(),
});
export type DeviceInfo = z.infer<typeof deviceSchema>;

/** The owner's limits in force on a provider (`nimble provide`), told to coordinators. */
export const providerLimitsSchema = z.object({
  /** How its workers are confined: bwrap, none (--no-sandbox) or unavailable (it refuses jobs). */
  sandbox: z.enum(["bwrap", "none", "unavailable"]),
  /** Per worker process (--max-memory); null: no limit. */
  max_memory_bytes: count.nullable(),
  max_processes: count,
  max_file_bytes: count,
  /** A job is ended after this many hours (--max-job-hours); null: no limit. */
  max_job_hours: z.number().finite().positive().nullable(),
  /** Whether jobs may bring requirements of their own (false: the owner's --no-job-requirements). */
  job_requirements: z.boolean().default(true),
});
export type ProviderLimits = z.infer<typeof providerLimitsSchema>;

/** What a provider measured of itself (`nimble bench`), cached per set of devices. */
export const providerProfileSchema = z.object({
  device: z.string().max(64),
  matmul_gflops_fp32: z.number().finite().nonnegative().nullable(),
  memory_gbps: z.number().finite().nonnegative().nullable(),
  measured_at: z.string().max(64),
});
export type ProviderProfile = z.infer<typeof providerProfileSchema>;

export const workerInfoSchema = z.object({
  params: count,
  param_bytes: count,
  model: z.string().max(1000),
  train_size: count,
  val_size: count,
});
export type WorkerInfo = z.infer<typeof workerInfoSchema>;

/** How a worker started: a provider's warm spare or cold; seconds its job waited for torch's import, then for init (task, data, model). */
export const workerStartupSchema = z.object({ warm: z.boolean(), import_s: z.number().finite().nonnegative().max(1e6), load_s: z.number().finite().nonnegative().max(1e6) });
export type WorkerStartup = z.infer<typeof workerStartupSchema>;

/** Validation metrics by name (an `eval_done` report's sums). */
export const metricsSchema = z.record(z.string().max(128), finite);

/** A worker's report of one step, as its worker sends it and as its provider forwards it. */
export const stepReportSchema = z.object({
  step: count,
  /** Mean loss over this worker's samples, before scaling by its share. */
  loss: finite,
  samples: count,
  lr: finite,
  compute_s: finite,
  /** Seconds spent waiting for all-reduces. */
  comm_s: finite,
  /** Of compute_s, the forward/backward over this worker's share: what shares are balanced on. */
  forward_backward_s: z.number().finite().nonnegative().optional(),
  /** sha256 of all parameters, when the step asked for it. */
  hash: z.string().max(128).optional(),
  /** True when a non-finite gradient made every worker skip this step's update. */
  skipped: z.boolean().default(false),
  /** Micro-batches the share was computed in. */
  micro_batches: count.default(0),
  /** Largest micro-batch the worker runs at once (null: its whole share); lowered when it runs out of device memory. */
  max_micro_batch: z.number().int().min(1).nullable().default(null),
  /** Names of this worker's non-finite gradients (or "loss"), on a skipped step. */
  nonfinite: z.array(z.string().max(256)).max(4096).optional(),
});

/**
 * The decision that ends a round (docs/protocol.md, "Two-phase rounds"): every replica
 * applies it (commit) or drops it (abort). It rides on the first orders sent after the
 * round's reports are in, or goes out alone in `decide`.
 */
export const decisionSchema = z.object({ step: count, verdict: z.enum(["commit", "abort"]) });
export type Decision = z.infer<typeof decisionSchema>;

export const toProviderSchema = z.discriminatedUnion("t", [
  /**
   * The coordinator's proof on this TLS session (src/identity/proof.ts). The fields are optional
   * here so that a hello of another protocol version is refused as such, not as malformed.
   */
  z.object({
    t: z.literal("hello"),
    version: z.number().int(),
    key: proofFields.key.optional(),
    nonce: proofFields.nonce.optional(),
    sig: proofFields.sig.optional(),
    mac: proofFields.mac,
  }),
  z.object({
    t: z.literal("job"),
    job: z.string().max(128),
    /** This provider's credential for its ranks, signed by the coordinator that sent the job. */
    credential: credentialSchema,
    task: z.object({ filename: z.string().regex(/^[A-Za-z0-9._-]{1,128}\.py$/), code: bytes }),
    config: z.record(z.string(), z.unknown()),
    world_size: z.number().int().min(1).max(4096),
    /** The ranks this provider hosts, each on one of its devices. */
    ranks: z.array(z.object({ rank: count, device: z.string().max(64) })).min(1),
    /** Every rank's data-plane URL and its provider's key (its certificate's), in ring order. */
    ring: z.array(ringMember),
    threads: z.number().int().min(1).max(1024).optional(),
    /** Joining a running job: start the workers, but wait for `ring` to enter the ring. */
    join: z.boolean().optional(),
    /**
     * A task package (a folder: src/job/package.ts) instead of one file: `task.code` is then
     * empty, and the provider asks for the package (`package_needed`) unless it has it cached.
     */
    package: z
      .object({ hash: z.string().regex(/^[0-9a-f]{64}$/), bytes: count.max(MAX_PACKAGE_BYTES), entry: z.string().regex(/^[A-Za-z0-9._-]{1,128}\.py$/) })
      .optional(),
    /**
     * The job's requirements, resolved by the coordinator (src/runtime/requirements.ts): the
     * provider installs exactly these wheels (its own check of every line) unless its owner forbids it.
     */
    requirements: z.object({ hash: z.string().regex(/^[0-9a-f]{64}$/), lock: z.string().max(64 * 1024) }).optional(),
    /** Pipeline parallelism (config `parallel`): the stages, and the groups each rank links into. */
    pipeline: pipelineSpecSchema.optional(),
    /**
     * The direct all-reduce (config `collective`): every rank also links to every other (pair
     * groups `direct:A:B`, src/collective/directMesh.ts) while the ring has at least
     * `direct_min_members` members (and at most `direct_max_members`). Absent: the ring only.
     */
    collective: z.object({ direct_min_members: z.number().int().min(2).max(4096), direct_max_members: z.number().int().min(2).max(4096).optional() }).optional(),
  }),
  /** Part of the package a provider asked for, in order: `offset` is the bytes sent before it. */
  z.object({ t: z.literal("package_chunk"), hash: z.string().regex(/^[0-9a-f]{64}$/), offset: count, data: bytes }),
  /**
   * Orders for the workers of `ranks` (each hosted here and in the ring), passed on as they
   * are: the worker-link header (`op` and its fields, one schema per operation in
   * src/protocol/workerOps.ts) and its payload. The provider validates the order and acts
   * only on its attempts (round orders start one; an abort decision ends it).
   */
  z.object({
    t: z.literal("order"),
    ranks: z.array(count).min(1).max(4096),
    order: z.record(z.string(), z.unknown()),
    payload: bytes.optional(),
    /**
     * On a round order: how the round's all-reduces on the job's ring run. An all-reduce of at
     * most `direct_max_bytes` wire bytes (null: any) takes the direct all-reduce when its links
     * are up; the others, and every all-reduce of a round without it, take the ring.
     */
    collective: collectiveChoiceSchema.optional(),
  }),
  /** Re-form the ring with only `members` (in ring order); local ranks left out stop. */
  z.object({
    t: z.literal("ring"),
    epoch: z.number().int().min(1),
    members: z.array(count).min(1).max(4096),
    /** Data-plane URLs of ranks that joined since the job started. */
    urls: z.array(ringMember).max(4096).optional(),
    /** Pipeline parallelism: the groups of this epoch (stage rings, pipes), beside the ring. */
    groups: z.array(groupSpecSchema).max(16384).optional(),
  }),
  /**
   * Pipeline: keep the state that rank `from` sends local rank `rank` under `tag` (a stage's
   * sole holder's, at a checkpoint boundary), in this provider's memory, replacing what it
   * kept of that stage before; answered by `mirror_kept`.
   */
  z.object({ t: z.literal("mirror_take"), rank: count, from: count, stage: count, tag: z.string().regex(/^[A-Za-z0-9:._-]{1,128}$/) }),
  /** Pipeline: send the state kept of `stage` from local rank `rank` to rank `to` (its replacement), under `tag`. */
  z.object({ t: z.literal("mirror_give"), rank: count, to: count, stage: count, tag: z.string().regex(/^[A-Za-z0-9:._-]{1,128}$/) }),
  /** Measure this provider's upload to the next member's provider (the `/bench` path, with its credential). */
  z.object({ t: z.literal("probe_links"), bytes: z.number().int().min(1024).max(256 * 1024 * 1024) }),
  z.object({ t: z.literal("cancel"), reason: z.string().max(1000) }),
]);
export type ToProvider = z.infer<typeof toProviderSchema>;

/** What is wrong with a job spec beyond its shape (ranks the job does not have), or null. */
export function jobSpecProblem(job: Extract<ToProvider, { t: "job" }>, devices: readonly { id: string }[]): string | null {
  for (const r of [...job.ranks, ...job.ring]) {
    if (r.rank >= job.world_size) return `the job names rank ${r.rank}, which is not below its world_size ${job.world_size}`;
  }
  if (new Set(job.ranks.map((r) => r.rank)).size !== job.ranks.length) return "the job names one of this provider's ranks twice";
  const offered = new Set(devices.map((d) => d.id));
  const device = job.ranks.find((r) => !offered.has(r.device))?.device;
  if (device !== undefined) return `the job asks for device ${JSON.stringify(device)}, which this provider does not offer (it offers ${[...offered].join(", ")})`;
  const ringRanks = job.ring.map((r) => r.rank);
  if (new Set(ringRanks).size !== ringRanks.length) return "the job's ring names a rank twice";
  if (!job.join && ringRanks.length !== job.world_size) return `the job's ring has ${ringRanks.length} addresses for ${job.world_size} ranks`;
  const url = job.ring.find((r) => !isRingUrl(r.url))?.url;
  if (url !== undefined) return `the job's ring address ${JSON.stringify(url.slice(0, 200))} is not a wss:// URL of a /ring endpoint`;
  return null;
}

/** A data-plane address a provider will connect to: wss://host:port/ring, nothing else (links are TLS). */
export function isRingUrl(url: string): boolean {
  try {
    const u = new URL(url);
    return u.protocol === "wss:" && u.pathname === "/ring" && u.username === "" && u.password === "";
  } catch {
    return false;
  }
}

/** debug: only with --verbose; warn and error: shown even with --quiet. */
export const logLevelSchema = z.enum(["debug", "info", "warn", "error"]);
export type LogLevel = z.infer<typeof logLevelSchema>;

export const toCoordinatorSchema = z.discriminatedUnion("t", [
  z.object({
    t: z.literal("welcome"),
    version: z.number().int(),
    provider: z.object({
      id: z.string().max(128),
      hostname: z.string().max(256),
      python: z.string().max(64),
      torch: z.string().max(64),
      devices: z.array(deviceSchema).min(1).max(64),
      profile: providerProfileSchema.optional(),
      limits: providerLimitsSchema.optional(),
    }),
    /** The provider's proof over the coordinator's nonce: signed by its certificate's key; MAC in token mode. */
    ...proofFields,
  }),
  z.object({ t: z.literal("reject"), reason: z.string().max(1000) }),
  /** The job's task package is not in this provider's cache: send it (package_chunk). */
  z.object({ t: z.literal("package_needed"), hash: z.string().regex(/^[0-9a-f]{64}$/) }),
  z.object({ t: z.literal("ready"), rank: count, info: workerInfoSchema, startup: workerStartupSchema.optional() }),
  /** This rank is linked into the ring of `epoch` (and its worker loaded). */
  z.object({ t: z.literal("ring_ready"), rank: count, epoch: count }),
  /** This rank's ring (of `epoch`) broke: a neighbour was lost or a link cut. It waits for `abort`. */
  z.object({ t: z.literal("ring_lost"), rank: count, epoch: count, reason: z.string().max(4096) }),
  /**
   * A worker's report, passed on as it came (validated against src/protocol/workerOps.ts),
   * with the ring bytes this rank sent since its previous report.
   */
  z.object({
    t: z.literal("report"),
    rank: count,
    bytes_sent: count,
    report: z.record(z.string(), z.unknown()),
    payload: bytes.optional(),
    /** The all-reduces this rank ran on the job's ring since its previous report, in order (the coordinator refines its cost model with them). */
    collectives: z.array(collectiveTimingSchema).max(4096).optional(),
    /** A large payload (a state's files) follows in `report_part`s of this rank, `payload_bytes` in all, instead of `payload`. */
    payload_bytes: count.max(MAX_CONTROL_BYTES).optional(),
  }),
  /** The next piece of the payload of this rank's last `report` (at most REPORT_PART_BYTES). */
  z.object({ t: z.literal("report_part"), rank: count, payload: bytes }),
  /** Upload from this rank's provider to its ring successor's; nulls when both are on one host. */
  z.object({
    t: z.literal("link"),
    rank: count,
    to: count,
    rtt_ms: z.number().finite().nonnegative().nullable(),
    upload_bytes_per_s: z.number().finite().positive().nullable(),
  }),
  /** Pipeline: local rank `rank` keeps `bytes` of stage `stage`'s state, sent under `tag` (mirror_take). */
  z.object({ t: z.literal("mirror_kept"), rank: count, stage: count, tag: z.string().max(128), bytes: count }),
  // level: how the coordinator shows it (debug lines only with --verbose; all go to train.log).
  z.object({ t: z.literal("log"), line: z.string().max(64 * 1024), level: logLevelSchema.optional() }),
  z.object({
    t: z.literal("failed"),
    rank: count.optional(),
    message: z.string().max(64 * 1024),
    where: z.string().max(1024).optional(),
    /** For kind "config": the config field at fault, e.g. `compression.rank`. */
    field: z.string().max(256).optional(),
    kind: z.enum(["task", "config", "worker", "ring", "requirements", "internal"]),
  }),
]);
export type ToCoordinator = z.infer<typeof toCoordinatorSchema>;

export function encodeMessage(message: ToProvider | ToCoordinator): Uint8Array {
  return encode(message, { ignoreUndefined: true });
}

function decodeWith<S extends z.ZodTypeAny>(schema: S, data: unknown, from: string): z.output<S> {
  if (!(data instanceof Uint8Array)) throw new ProtocolError(`${from} sent a text frame; control messages are binary msgpack`);
  if (data.byteLength > MAX_CONTROL_BYTES) throw new ProtocolError(`${from} sent a ${data.byteLength}-byte message`);
  let raw: unknown;
  try {
    raw = decode(data);
  } catch (err) {
    throw new ProtocolError(`${from} sent a message that is not msgpack: ${(err as Error).message}`);
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new ProtocolError(`${from} sent an invalid message: ${issue.path.join(".") || "(root)"}: ${issue.message}`);
  }
  return parsed.data;
}

export const decodeToProvider = (data: unknown, from = "coordinator") => decodeWith(toProviderSchema, data, from);
export const decodeToCoordinator = (data: unknown, from: string) => decodeWith(toCoordinatorSchema, data, from);
