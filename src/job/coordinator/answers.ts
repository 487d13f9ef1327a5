import { ProtocolError } from "../../errors.js";
import type { ToCoordinator } from "../../protocol/messages.js";
import { parseFromWorker, providerHandles, type FromWorker, type ReportOp } from "../../protocol/workerOps.js";

type Reported<K extends ReportOp> = Omit<Extract<FromWorker, { op: K }>, "op"> & { t: K; rank: number; bytes_sent: number };
type StateReport = Omit<Reported<"state">, "files"> & { files: { name: string; data: Uint8Array }[] };

/** A worker's report as the coordinator takes it: its own fields, its rank, and the ring bytes its provider counted. */
export type Report = { [K in Exclude<ReportOp, "state">]: Reported<K> }[Exclude<ReportOp, "state">] | StateReport;

/** What a provider sends, with each worker report unpacked and validated. */
export type Incoming = Exclude<ToCoordinator, { t: "report" }> | Report;

/** What exchanges collect: per-rank provider messages and worker reports. */
export type Answer = Extract<Incoming, { rank: number }>;
export type AnswerKind = Answer["t"];

/**
 * Unpacks a provider's message: a `report` envelope is validated against the worker's own
 * schema (src/protocol/workerOps.ts) and becomes a typed report; the rest pass as they are.
 */
export function unpack(m: ToCoordinator, from: string): Incoming {
  if (m.t !== "report") return m;
  const payload = m.payload ?? new Uint8Array(0);
  const r = parseFromWorker({ header: m.report, payload }, `rank ${m.rank} (${from})`);
  if (providerHandles.has(r.op)) throw new ProtocolError(`${from} passed on a worker's ${r.op}, which it should have acted on`);
  const { op, ...fields } = r;
  if (op !== "state") return { ...fields, t: op, rank: m.rank, bytes_sent: m.bytes_sent } as Report;
  const state = fields as Omit<Extract<FromWorker, { op: "state" }>, "op">;
  let at = 0;
  const files = state.files.map((f) => {
    const data = payload.subarray(at, at + f.size);
    at += f.size;
    return { name: f.name, data };
  });
  return { ...state, files, t: "state", rank: m.rank, bytes_sent: m.bytes_sent };
}
