import { z } from "zod";
import { ProtocolError } from "../errors.js";
import { decisionSchema, stepReportSchema, workerInfoSchema } from "./messages.js";

/**
 * The worker link (provider <-> its own Python worker, fd 3; docs/protocol.md, "Worker
 * link"): one schema per operation, in both directions. The provider types what it sends
 * with `ToWorker` and validates everything its worker sends with `parseFromWorker`;
 * python-runtime/nimble_worker/__main__.py serves the same orders (a test holds the two
 * lists together). A new strategy adds its rounds to `strategyOrders` and their reports
 * to `fromWorker`.
 */
const count = z.number().int().min(0);
const finite = z.number().finite();
const hash = z.string().max(128);
const codec = z.enum(["f32", "f16", "bf16", "int8"]);
const stateKind = z.enum(["checkpoint", "final", "compressor"]);
const fileEntry = z.object({ name: z.string().max(128), size: count });
const speed = z.number().gt(0).lte(1);
/** The last round's decision, riding on an order that every member receives: applied on receipt. */
const decision = decisionSchema.optional();

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
  }),
  /** Rank `source` contributes its parameters to one all-reduce, the others zeros. */
  sync: z.object({ op: z.literal("sync"), source: count.optional() }),
  /** The ring re-formed: all-gathers now carry `size` blobs. No reply. */
  ring: z.object({ op: z.literal("ring"), size: z.number().int().min(1) }),
  /** Every member takes rank `source`'s whole training state over one all-gather. */
  sync_state: z.object({ op: z.literal("sync_state"), source: count, decision }),
  /** A decision alone: apply it (an abort also ends the round waiting on a collective); reply with the hash after it. */
  decide: decisionSchema.extend({ op: z.literal("decide") }),
  eval: z.object({ op: z.literal("eval"), step: count, start: count, count, batch_size: z.number().int().min(1), decision }),
  state: z.object({ op: z.literal("state"), kind: stateKind, decision }),
  /** Payload: the files' bytes concatenated in order. */
  load_state: z.object({ op: z.literal("load_state"), files: z.array(fileEntry) }),
  /** No reply; also while the worker waits for a collective's result. */
  set_speed: z.object({ op: z.literal("set_speed"), speed }),
  stop: z.object({ op: z.literal("stop") }),
  /** Payload: `count` float32 elements, the sum over the ring. */
  allreduce_result: z.object({ op: z.literal("allreduce_result"), id: count, dtype: z.literal("float32"), count, codec: codec.optional() }),
  /** Payload: every member's blob, concatenated in ring order. */
  allgather_result: z.object({ op: z.literal("allgather_result"), id: count, sizes: z.array(count) }),
};

/** The rounds of each strategy (its `Strategy.orders` on the worker), by strategy name. */
export const strategyOrders = {
  sync: {
    /** One optimizer step of the global batch; `attempt` is echoed in its collectives. */
    step: z.object({ op: z.literal("step"), step: count, shares: z.array(count), want_hash: z.boolean(), attempt: count, decision }),
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
  }),
  allgather: z.object({ op: z.literal("allgather"), id: count, size: count, attempt: count.default(0) }),
  synced: z.object({ op: z.literal("synced"), hash }),
  synced_state: z.object({ op: z.literal("synced_state"), step: count, hash }),
  /** The decision for round `step` is applied; `next_step` is the step it runs next, `hash` of its parameters now. */
  decided: decisionSchema.extend({ op: z.literal("decided"), next_step: count, hash }),
  step_done: stepReportSchema.extend({
    op: z.literal("step_done"),
    /** float32 elements the step's gradient would all-reduce uncompressed. */
    dense_count: count.default(0),
  }),
  eval_done: z.object({ op: z.literal("eval_done"), step: count, count, sums: z.record(z.string(), finite) }),
  state: z.object({ op: z.literal("state"), kind: stateKind, step: count, files: z.array(fileEntry) }),
  loaded: z.object({ op: z.literal("loaded"), step: count }),
  error: z.object({
    op: z.literal("error"),
    message: z.string(),
    where: z.string().optional(),
    kind: z.string().optional(),
    field: z.string().optional(),
  }),
};

type Orders = typeof sharedOrders & (typeof strategyOrders)[keyof typeof strategyOrders];
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
  eval: ["eval_done"],
  state: ["state"],
  load_state: ["loaded"],
  set_speed: [],
  stop: [],
  allreduce_result: [],
  allgather_result: [],
  /** decided: an abort arrived while the round waited on a collective. */
  step: ["step_done", "decided"],
};

/** Payload bytes each message from the worker must carry (none unless listed). */
const payloadBytes: { [K in FromWorkerOp]?: (m: z.output<(typeof fromWorker)[K]>) => number } = {
  allreduce: (m) => m.count * 4,
  allgather: (m) => m.size,
  state: (m) => m.files.reduce((sum, f) => sum + f.size, 0),
};

function payloadProblem(m: FromWorker, bytes: number): string | null {
  const want = (payloadBytes[m.op] as ((m: FromWorker) => number) | undefined)?.(m) ?? 0;
  if (bytes === want) return null;
  if (m.op === "allreduce") return `an allreduce of ${bytes} bytes for ${m.count} float32 elements`;
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
