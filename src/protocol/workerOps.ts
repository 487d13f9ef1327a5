import { z } from "zod";
import { ProtocolError } from "../errors.js";
import { decisionSchema, metricsSchema, stepReportSchema, workerInfoSchema } from "./messages.js";

/**
 * The worker link (provider <-> its own Python worker, fd 3; docs/protocol.md, "Worker
 * link"): one schema per operation, in both directions. The coordinator's orders reach a
 * worker in `order` envelopes and its reports come back in `report` envelopes; the
 * provider validates both here (`parseOrder`, `parseFromWorker`) and passes them on
 * unread, acting only on lifecycle (`init`, `ready`, `stop`, `error`), collectives and
 * attempts (`roundOrders` start one; an abort `decide` ends it). The coordinator
 * validates the reports again. python-runtime/nimble_worker/__main__.py serves the same
 * orders (a test holds the lists together). A new strategy adds its rounds to
 * `strategyOrders` and their reports to `fromWorker`: the provider needs no change.
 */
const count = z.number().int().min(0);
const hash = z.string().max(128);
const codec = z.enum(["f32", "f16", "bf16", "int8", "int4"]);
const stateKind = z.enum(["checkpoint", "final", "compressor"]);
/** A state file: its name becomes a file in a run directory, so it is a plain name. */
const fileEntry = z.object({ name: z.string().regex(/^[A-Za-z0-9._-]{1,128}$/), size: count });
const speed = z.number().gt(0).lte(1);
/** A point-to-point message's tag between pipeline stages (`f:step:chain:micro-batch`, ...). */
const pipeTag = z.string().regex(/^[A-Za-z0-9:._-]{1,128}$/);
/** Which ring a collective runs on: absent, the job's; `stage`, the worker's stage replicas'. */
const group = z.literal("stage").optional();
/** The last round's decision, riding on an order that every member receives: applied on receipt. */
const decision = decisionSchema.optional();

const seconds = z.number().finite().nonnegative();
/** One stage worker's figures of a pipeline step; the timeline is bounded (4 entries per micro-batch). */
export const pipelineReportSchema = z.object({
  stage: count,
  chains: z.array(count).max(4096),
  compute_s: seconds,
  send_s: seconds,
  recv_s: seconds,
  bubble_s: seconds,
  peak_saved_bytes: count,
  act_bytes_sent: count,
  /** The worker's resident memory at the end of the step (what --max-memory limits). */
  rss_bytes: count.optional(),
  /** [F or B, chain, micro-batch, start, end] with wall-clock seconds (time.time()). */
  timeline: z.array(z.tuple([z.enum(["F", "B"]), count, count, z.number().finite(), z.number().finite()])).max(65536).default([]),
});
export type PipelineReport = z.infer<typeof pipelineReportSchema>;

/** Orders every strategy shares, from the provider to its worker. */
export const sharedOrders = {
  init: z.object({
    op: z.literal("init"),
    task_path: z.string(),
    /** The validated job config, snake_case keys as in YAML. */
    config: z.record(z.string(), z.unknown()),
    rank: count,
    world_size: z.number().int().min(1),
    device: z.string().max(64),
    /** torch intra-op threads. */
    threads: z.number().int().min(1),
    max_micro_batch: z.number().int().min(1).optional(),
    speed: speed.optional(),
    /**
     * The owner's limits, which the worker sets on itself before any task code runs:
     * RLIMIT_NPROC and RLIMIT_FSIZE; on a GPU, max_memory_bytes also caps torch's share
     * of the device (set_per_process_memory_fraction).
     */
    /** The task's package folder (a task that is a folder): its modules import, its files are beside __file__. */
    package_dir: z.string().max(4096).optional(),
    /** The job's installed requirements: added to the module path after the base environment's (site.addsitedir). */
    site_dirs: z.array(z.string().max(4096)).max(8).optional(),
    limits: z
      .object({ max_processes: z.number().int().min(16), max_file_bytes: z.number().int().min(1), max_memory_bytes: z.number().int().min(1).nullable() })
      .optional(),
    /** Pipeline parallelism: the stage this worker holds, of `stages`, and where each stage's layers start (null: the task's build_stages). */
    pipeline: z.object({ stage: count, stages: z.number().int().min(1), bounds: z.array(count).max(4097).nullable() }).optional(),
    /** The job's variables (NIMBLE_RANK, ...), set before the task loads: a warm spare was started without them. */
    env: z.record(z.string().regex(/^[A-Z_][A-Z0-9_]{0,63}$/), z.string().max(4096)).optional(),
    /** The worker's descriptor of the buffer it shares with its provider (its all-reduces: `shared`); absent: none. */
    shared_fd: z.number().int().min(3).max(1023).optional(),
  }),
  /** Rank `source` contributes its parameters to one all-reduce, the others zeros. */
  sync: z.object({ op: z.literal("sync"), source: count.optional() }),
  /** The ring re-formed: all-gathers now carry `size` blobs. No reply. */
  ring: z.object({ op: z.literal("ring"), size: z.number().int().min(1) }),
  /** Every member takes rank `source`'s whole training state over one all-gather. */
  sync_state: z.object({ op: z.literal("sync_state"), source: count, decision }),
  /** A decision alone: apply it (an abort also ends the round waiting on a collective); reply with the hash after it. */
  decide: decisionSchema.extend({
    op: z.literal("decide"),
    /** The provider's first attempt still alive after an abort: rounds ordered ahead before it are dropped. */
    attempt: count.optional(),
    /** A commit sent while the worker runs a round ordered ahead: applied at once, no reply. */
    quiet: z.boolean().optional(),
  }),
  /** Pipeline: `chains` (as in pipe_step) share the items; only last stages report sums. */
  /** Pipeline: send this worker's whole training state to rank `to` (whose provider keeps it), under `tag`. */
  mirror: z.object({ op: z.literal("mirror"), to: count, tag: pipeTag, decision }),
  /** Pipeline: take the state rank `from`'s provider kept (sent under `tag`) in place of this worker's own. */
  load_mirror: z.object({ op: z.literal("load_mirror"), from: count, tag: pipeTag }),
  eval: z.object({ op: z.literal("eval"), step: count, start: count, count, batch_size: z.number().int().min(1), chains: z.array(z.array(count).max(4096)).max(4096).optional(), decision }),
  state: z.object({ op: z.literal("state"), kind: stateKind, decision }),
  /** Payload: the files' bytes concatenated in order. */
  load_state: z.object({ op: z.literal("load_state"), files: z.array(fileEntry).max(4096) }),
  /** No reply; also while the worker waits for a collective's result. */
  set_speed: z.object({ op: z.literal("set_speed"), speed }),
  stop: z.object({ op: z.literal("stop") }),
  /** Payload: `count` float32 elements, the sum over the ring; `shared`: none, the sum is in the shared buffer. */
  allreduce_result: z.object({ op: z.literal("allreduce_result"), id: count, dtype: z.literal("float32"), count, codec: codec.optional(), shared: z.literal(true).optional() }),
  /** Payload: every member's blob, concatenated in ring order. */
  allgather_result: z.object({ op: z.literal("allgather_result"), id: count, sizes: z.array(count).max(4096) }),
  /** A pipe_send's bytes are on their way (handed to the link). */
  pipe_sent: z.object({ op: z.literal("pipe_sent"), id: count }),
  /** Payload: the message a pipe_recv asked for. */
  pipe_data: z.object({ op: z.literal("pipe_data"), id: count, tag: pipeTag }),
};

/** The rounds of each strategy (its `Strategy.orders` on the worker), by strategy name. */
export const strategyOrders = {
  sync: {
    /** One optimizer step of the global batch; `attempt` is echoed in its collectives. */
    step: z.object({
      op: z.literal("step"),
      step: count,
      shares: z.array(count).max(4096),
      want_hash: z.boolean(),
      attempt: count,
      decision,
      /** Sent before the previous step's reports were in: the worker applies that step first (orders ahead). */
      ahead: z.boolean().optional(),
    }),
  },
  diloco: {
    /** `steps` inner steps from `step`, each of the global batch split by `shares`, then the sync of one fragment. */
    round: z.object({ op: z.literal("round"), step: count, steps: z.number().int().min(1).max(1_000_000), shares: z.array(count).max(4096), want_hash: z.boolean(), attempt: count, decision }),
  },
  pipeline: {
    /**
     * One optimizer step through the stages: chains[d][s] is the rank serving stage s for
     * chain d, shares[d] its samples (in micro-batches); a worker serves every chain naming it.
     */
    pipe_step: z.object({
      op: z.literal("pipe_step"),
      step: count,
      chains: z.array(z.array(count).min(1).max(4096)).min(1).max(4096),
      shares: z.array(count).max(4096),
      want_hash: z.boolean(),
      attempt: count,
      decision,
    }),
  },
};

/** Messages from the worker to its provider. */
export const fromWorker = {
  ready: workerInfoSchema.extend({ op: z.literal("ready") }),
  allreduce: z.object({
    op: z.literal("allreduce"),
    id: count,
    dtype: z.literal("float32"),
    count,
    codec: codec.default("f32"),
    /** The step attempt it belongs to (from the `step` message); stale ones are dropped. */
    attempt: count.default(0),
    group,
    /** The `count` elements are the first of the shared buffer (no payload), and the sum goes there. */
    shared: z.literal(true).optional(),
  }),
  allgather: z.object({ op: z.literal("allgather"), id: count, size: count, attempt: count.default(0), group }),
  /** Payload: `size` bytes for rank `to` (a neighbouring stage's worker), under `tag`. */
  pipe_send: z.object({ op: z.literal("pipe_send"), id: count, to: count, tag: pipeTag, size: count, attempt: count.default(0) }),
  /** The message rank `from` sends under `tag` (answered by pipe_data). */
  pipe_recv: z.object({ op: z.literal("pipe_recv"), id: count, from: count, tag: pipeTag, attempt: count.default(0) }),
  synced: z.object({ op: z.literal("synced"), hash }),
  synced_state: z.object({ op: z.literal("synced_state"), step: count, hash }),
  /** The state the `mirror` order sent: of next step `step`, `bytes` long. */
  mirrored: z.object({ op: z.literal("mirrored"), step: count, bytes: count }),
  /** The decision for round `step` is applied; `next_step` is the step it runs next, `hash` of its parameters now. */
  decided: decisionSchema.extend({ op: z.literal("decided"), next_step: count, hash }),
  step_done: stepReportSchema.extend({
    op: z.literal("step_done"),
    /** float32 elements the step's gradient would all-reduce uncompressed. */
    dense_count: count.default(0),
    /** Pipeline: this stage's figures of the step (src/strategy/pipeline.ts). */
    pipeline: pipelineReportSchema.optional(),
  }),
  /** A DiLoCo round: its inner steps' figures, and the sync of fragment `fragment`. */
  round_done: stepReportSchema.extend({
    op: z.literal("round_done"),
    steps: z.number().int().min(1),
    fragment: count,
    outer_lr: z.number().finite(),
    /** Seconds of the sync's communication that ran while inner steps computed. */
    hidden_s: z.number().finite().nonnegative().default(0),
    /** float32 elements of the pseudo-gradient all-reduced. */
    dense_count: count.default(0),
    /** float32 elements of the whole model's gradient (what DDP all-reduces every inner step). */
    model_count: count.optional(),
  }),
  /** `sums` of each metric over its `counts` (items, or the task's own units: tokens, positives). */
  eval_done: z.object({ op: z.literal("eval_done"), step: count, count, sums: metricsSchema, counts: metricsSchema.optional() }),
  state: z.object({ op: z.literal("state"), kind: stateKind, step: count, files: z.array(fileEntry).max(4096) }),
  loaded: z.object({ op: z.literal("loaded"), step: count }),
  error: z.object({
    op: z.literal("error"),
    message: z.string(),
    where: z.string().optional(),
    kind: z.string().optional(),
    field: z.string().optional(),
  }),
};

type Orders = typeof sharedOrders & typeof strategyOrders.sync & typeof strategyOrders.diloco & typeof strategyOrders.pipeline;
export type OrderOp = keyof Orders;
/** What a provider may send its worker (defaults not yet applied: as written). */
export type ToWorker = { [K in OrderOp]: z.input<Orders[K]> }[OrderOp];
export type FromWorkerOp = keyof typeof fromWorker;
export type FromWorker = { [K in FromWorkerOp]: z.output<(typeof fromWorker)[K]> }[FromWorkerOp];

/**
 * What answers each order: the reports it may produce (besides `error`, which any order may
 * bring, and the collectives a worker sends while it runs). Empty: no reply.
 */
export const replies: Record<OrderOp, readonly FromWorkerOp[]> = {
  init: ["ready"],
  sync: ["synced"],
  ring: [],
  sync_state: ["synced_state"],
  decide: ["decided"],
  mirror: ["mirrored"],
  load_mirror: ["loaded"],
  eval: ["eval_done"],
  state: ["state"],
  load_state: ["loaded"],
  set_speed: [],
  stop: [],
  allreduce_result: [],
  allgather_result: [],
  pipe_sent: [],
  pipe_data: [],
  /** decided: an abort arrived while the round waited on a collective. */
  step: ["step_done", "decided"],
  round: ["round_done", "decided"],
  pipe_step: ["step_done", "decided"],
};

/** Payload bytes each message from the worker must carry (none unless listed). */
const payloadBytes: { [K in FromWorkerOp]?: (m: z.output<(typeof fromWorker)[K]>) => number } = {
  allreduce: (m) => (m.shared ? 0 : m.count * 4),
  allgather: (m) => m.size,
  pipe_send: (m) => m.size,
  state: (m) => m.files.reduce((sum, f) => sum + f.size, 0),
};

function payloadProblem(m: FromWorker, bytes: number): string | null {
  const want = (payloadBytes[m.op] as ((m: FromWorker) => number) | undefined)?.(m) ?? 0;
  if (bytes === want) return null;
  if (m.op === "allreduce") return m.shared ? `a shared-buffer allreduce with a ${bytes}-byte payload (it carries none)` : `an allreduce of ${bytes} bytes for ${m.count} float32 elements`;
  if (m.op === "allgather") return `an allgather of ${bytes} bytes announced as ${m.size}`;
  if (m.op === "state") return `state files totalling ${want} bytes in a ${bytes}-byte payload`;
  return `a ${m.op} message with a ${bytes}-byte payload (it carries none)`;
}

/** Validates one message from a worker (`label` names it in errors, e.g. `rank 2`). */
export function parseFromWorker(message: { header: Record<string, unknown>; payload: Uint8Array }, label: string): FromWorker {
  const op = String(message.header.op);
  const schema = Object.hasOwn(fromWorker, op) ? fromWorker[op as FromWorkerOp] : undefined;
  if (!schema) {
    throw new ProtocolError(`${label} sent an invalid ${op} message: op: expected one of ${Object.keys(fromWorker).join(", ")}`);
  }
  const parsed = schema.safeParse(message.header);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new ProtocolError(`${label} sent an invalid ${op} message: ${issue.path.join(".")}: ${issue.message}`);
  }
  const m = parsed.data as FromWorker;
  const problem = payloadProblem(m, message.payload.byteLength);
  if (problem) throw new ProtocolError(`${label} sent ${problem}`);
  return m;
}

/** Orders the provider itself sends its workers (lifecycle, the ring, testing aids, collectives). */
const PROVIDER_ORDERS = ["init", "ring", "set_speed", "stop", "allreduce_result", "allgather_result", "pipe_sent", "pipe_data"] as const;
const providerOrders = new Set<string>(PROVIDER_ORDERS);
type RoundOp = keyof typeof strategyOrders.sync | keyof typeof strategyOrders.diloco | keyof typeof strategyOrders.pipeline;
type CoordinatorOp = Exclude<OrderOp, (typeof PROVIDER_ORDERS)[number]>;
/** What a coordinator may order a worker (round orders without their `attempt`: the provider adds it). */
export type CoordinatorOrder = { [K in CoordinatorOp]: K extends RoundOp ? Omit<z.input<Orders[K]>, "attempt"> : z.input<Orders[K]> }[CoordinatorOp];

/** Orders that start a round: the provider gives each an `attempt` that its collectives carry. */
export function isRoundOrder(op: string): boolean {
  return Object.values(strategyOrders).some((orders) => Object.hasOwn(orders, op));
}

/** Every order's schema (read from the tables each time: a strategy's orders are there once it adds them). */
function orderSchema(op: string): z.ZodTypeAny | undefined {
  if (Object.hasOwn(sharedOrders, op)) return sharedOrders[op as keyof typeof sharedOrders];
  for (const orders of Object.values(strategyOrders) as Record<string, z.ZodTypeAny>[]) if (Object.hasOwn(orders, op)) return orders[op];
  return undefined;
}

/** Payload bytes each order carries (none unless listed). */
const orderPayloadBytes: Record<string, (order: Record<string, unknown>) => number> = {
  load_state: (o) => (o.files as { size: number }[]).reduce((sum, f) => sum + f.size, 0),
};

/**
 * Validates an order from the coordinator for a worker (`from` names the sender in errors).
 * Round orders get their `attempt` from the provider, so the coordinator sends none.
 */
export function parseOrder(order: Record<string, unknown>, payloadBytes: number, from: string): ToWorker {
  const op = String(order.op);
  const schema = providerOrders.has(op) ? undefined : orderSchema(op);
  if (!schema) throw new ProtocolError(`${from} sent an order ${op} that is not a worker operation it may send`);
  const parsed = schema.safeParse(isRoundOrder(op) ? { ...order, attempt: 0 } : order);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new ProtocolError(`${from} sent an invalid ${op} order: ${issue.path.join(".")}: ${issue.message}`);
  }
  const want = orderPayloadBytes[op]?.(parsed.data) ?? 0;
  if (want !== payloadBytes) throw new ProtocolError(`${from} sent a ${op} order with a ${payloadBytes}-byte payload, ${want} expected`);
  return parsed.data as ToWorker;
}

/** Messages of a worker that its provider acts on itself; every other one is a report, passed on. */
export const providerHandles: ReadonlySet<FromWorkerOp> = new Set(["ready", "allreduce", "allgather", "pipe_send", "pipe_recv", "error"]);
export type ReportOp = Exclude<FromWorkerOp, "ready" | "allreduce" | "allgather" | "pipe_send" | "pipe_recv" | "error">;
