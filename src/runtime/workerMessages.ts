import { z } from "zod";
import { ProtocolError } from "../errors.js";
import { stepReportSchema, workerInfoSchema } from "../protocol/messages.js";
import type { WorkerMessage } from "./workerLink.js";

/** Headers a Python worker may send on its link (docs/protocol.md, "Worker link"). */
const count = z.number().int().min(0);
const finite = z.number().finite();

export const fromWorkerSchema = z.discriminatedUnion("op", [
  workerInfoSchema.extend({ op: z.literal("ready") }),
  z.object({
    op: z.literal("allreduce"),
    id: count,
    dtype: z.literal("float32"),
    count,
    codec: z.enum(["f32", "f16", "bf16", "int8"]).default("f32"),
    /** The step attempt it belongs to (from the `step` message); stale ones are dropped. */
    attempt: count.default(0),
  }),
  z.object({ op: z.literal("allgather"), id: count, size: count, attempt: count.default(0) }),
  z.object({ op: z.literal("synced_state"), step: count, hash: z.string() }),
  /** The step was abandoned (an `abort` arrived): nothing of it was applied. */
  z.object({ op: z.literal("aborted"), step: count }),
  /** The pending update is applied; `step` is the next step, `hash` of the parameters now. */
  z.object({ op: z.literal("committed"), step: count, hash: z.string() }),
  z.object({ op: z.literal("synced"), hash: z.string() }),
  stepReportSchema.extend({
    op: z.literal("step_done"),
    /** float32 elements the step's gradient would all-reduce uncompressed. */
    dense_count: count.default(0),
  }),
  z.object({ op: z.literal("eval_done"), step: count, count, sums: z.record(z.string(), finite) }),
  z.object({
    op: z.literal("state"),
    kind: z.enum(["checkpoint", "final", "compressor"]),
    step: count,
    files: z.array(z.object({ name: z.string(), size: count })),
  }),
  z.object({ op: z.literal("loaded"), step: count }),
  z.object({
    op: z.literal("error"),
    message: z.string(),
    where: z.string().optional(),
    kind: z.string().optional(),
    field: z.string().optional(),
  }),
]);
export type FromWorker = z.infer<typeof fromWorkerSchema>;

export function parseWorkerMessage(message: WorkerMessage, label: string): FromWorker {
  const parsed = fromWorkerSchema.safeParse(message.header);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new ProtocolError(`${label} sent an invalid ${String(message.header.op)} message: ${issue.path.join(".")}: ${issue.message}`);
  }
  const m = parsed.data;
  if (m.op === "allreduce" && message.payload.byteLength !== m.count * 4) {
    throw new ProtocolError(`${label} sent an allreduce of ${message.payload.byteLength} bytes for ${m.count} float32 elements`);
  }
  if (m.op === "allgather" && message.payload.byteLength !== m.size) {
    throw new ProtocolError(`${label} sent an allgather of ${message.payload.byteLength} bytes announced as ${m.size}`);
  }
  if (m.op === "state") {
    const total = m.files.reduce((sum, f) => sum + f.size, 0);
    if (total !== message.payload.byteLength) throw new ProtocolError(`${label} sent state files totalling ${total} bytes in a ${message.payload.byteLength}-byte payload`);
  }
  return m;
}
