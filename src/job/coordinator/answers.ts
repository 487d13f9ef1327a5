import { ProtocolError } from "../../errors.js";
import { cleanText, MAX_PEER_TEXT } from "../../protocol/text.js";
import type { CollectiveTiming, ToCoordinator } from "../../protocol/messages.js";
import { parseFromWorker, providerHandles, type FromWorker, type ReportOp } from "../../protocol/workerOps.js";

type Reported<K extends ReportOp> = Omit<Extract<FromWorker, { op: K }>, "op"> & { t: K; rank: number; bytes_sent: number; collectives?: CollectiveTiming[] };
type StateReport = Omit<Reported<"state">, "files"> & { files: { name: string; data: Uint8Array }[] };

/** A worker's report as the coordinator takes it: its own fields, its rank, and the ring bytes its provider counted. */
export type Report = { [K in Exclude<ReportOp, "state">]: Reported<K> }[Exclude<ReportOp, "state">] | StateReport;

/** What a provider sends, with each worker report unpacked and validated (its parts put together). */
export type Incoming = Exclude<ToCoordinator, { t: "report" } | { t: "report_part" }> | Report;

type ReportEnvelope = Extract<ToCoordinator, { t: "report" }>;

/**
 * Puts back together the reports whose payload a provider sent in pieces: a `report` with
 * `payload_bytes`, then `report_part`s of that rank until they add up. The payload is
 * copied once, into a buffer of the announced size. `take` gives each message once it is
 * whole (a report with its payload), null while a report's parts are still coming.
 */
export class ReportParts {
  #open = new Map<number, { m: ReportEnvelope; payload: Uint8Array; filled: number }>();

  take(m: ToCoordinator, from: string): Exclude<ToCoordinator, { t: "report_part" }> | null {
    if (m.t === "report" && m.payload_bytes !== undefined) {
      if (m.payload !== undefined) throw new ProtocolError(`${from} sent a report of rank ${m.rank} with both a payload and payload_bytes`);
      if (this.#open.has(m.rank)) throw new ProtocolError(`${from} sent a report of rank ${m.rank} before the parts of its last one`);
      const { payload_bytes: size, ...rest } = m;
      if (size === 0) return rest;
      this.#open.set(m.rank, { m: rest, payload: new Uint8Array(size), filled: 0 });
      return null;
    }
    if (m.t !== "report_part") {
      if (m.t === "report" && this.#open.has(m.rank)) throw new ProtocolError(`${from} sent a report of rank ${m.rank} before the parts of its last one`);
      return m;
    }
    const open = this.#open.get(m.rank);
    if (!open) throw new ProtocolError(`${from} sent a report part of rank ${m.rank} with no report announcing it`);
    if (open.filled + m.payload.byteLength > open.payload.byteLength) {
      throw new ProtocolError(`${from} sent report parts of rank ${m.rank} beyond the ${open.payload.byteLength} bytes announced`);
    }
    open.payload.set(m.payload, open.filled);
    open.filled += m.payload.byteLength;
    if (open.filled < open.payload.byteLength) return null;
    this.#open.delete(m.rank);
    return { ...open.m, payload: open.payload };
  }
}

/** What exchanges collect: per-rank provider messages and worker reports. */
export type Answer = Extract<Incoming, { rank: number }>;
export type AnswerKind = Answer["t"];

/**
 * Unpacks a provider's message: a `report` envelope is validated against the worker's own
 * schema (src/protocol/workerOps.ts) and becomes a typed report; the rest pass as they are.
 */
export function unpack(m: Exclude<ToCoordinator, { t: "report_part" }>, from: string): Incoming {
  if (m.t !== "report") return cleanProviderText(m);
  const payload = m.payload ?? new Uint8Array(0);
  const r = parseFromWorker({ header: m.report, payload }, `rank ${m.rank} (${from})`);
  if (providerHandles.has(r.op)) throw new ProtocolError(`${from} passed on a worker's ${r.op}, which it should have acted on`);
  const { op, ...fields } = r;
  if (op !== "state") return { ...fields, t: op, rank: m.rank, bytes_sent: m.bytes_sent, ...(m.collectives ? { collectives: m.collectives } : {}) } as Report;
  const state = fields as Omit<Extract<FromWorker, { op: "state" }>, "op">;
  let at = 0;
  const files = state.files.map((f) => {
    const data = payload.subarray(at, at + f.size);
    at += f.size;
    return { name: f.name, data };
  });
  return { ...state, files, t: "state", rank: m.rank, bytes_sent: m.bytes_sent };
}

/**
 * A provider's words are printed (status lines, errors, the workers table): at this one
 * intake they lose terminal control characters and are cut to a printable length.
 */
function cleanProviderText(m: Exclude<ToCoordinator, { t: "report" } | { t: "report_part" }>): Exclude<ToCoordinator, { t: "report" } | { t: "report_part" }> {
  const line = (s: string, max = 256) => cleanText(s, max);
  const block = (s: string) => cleanText(s, MAX_PEER_TEXT, { multiline: true });
  switch (m.t) {
    case "log":
      return { ...m, line: cleanText(m.line, MAX_PEER_TEXT) };
    case "failed":
      return { ...m, message: block(m.message), ...(m.where === undefined ? {} : { where: line(m.where, 1024) }), ...(m.field === undefined ? {} : { field: line(m.field) }) };
    case "ring_lost":
      return { ...m, reason: block(m.reason) };
    case "reject":
      return { ...m, reason: line(m.reason, 1000) };
    case "ready":
      return { ...m, info: { ...m.info, model: line(m.info.model, 1000) } };
    case "welcome": {
      const p = m.provider;
      const devices = p.devices.map((d) => ({ ...d, id: line(d.id), kind: line(d.kind), name: line(d.name) }));
      return { ...m, provider: { ...p, id: line(p.id), hostname: line(p.hostname), python: line(p.python), torch: line(p.torch), devices } };
    }
    default:
      return m;
  }
}
