/**
 * Data-plane (ring) frames: see docs/protocol.md, "Data plane (ring)".
 *
 * Every binary WebSocket message on `/ring` is one frame; its first byte is the kind:
 * - 0x01 control: the rest is a msgpack map (`hello` or `op`), validated by schema;
 * - 0x02 tensor chunk: a fixed 24-byte little-endian header, then `count` float32
 *   values, little-endian.
 *
 * `decodeFrame` validates everything and throws ProtocolError with a precise message.
 */
import { decode as msgpackDecode, encode as msgpackEncode } from "@msgpack/msgpack";
import { endianness } from "node:os";
import { z } from "zod";
import { ProtocolError } from "../errors.js";

export const FRAME_CONTROL = 0x01;
export const FRAME_CHUNK = 0x02;
/** dtype code of a tensor chunk: 1 = float32 (the only one so far). */
export const DTYPE_FLOAT32 = 1;
export const CHUNK_HEADER_BYTES = 24;
/** Default tensor payload per chunk frame: 256 KiB = 65536 float32 values. */
export const DEFAULT_CHUNK_BYTES = 256 * 1024;
/** Room above the chunk payload for headers and control frames. */
export const FRAME_HEADER_SLACK = 64 * 1024;
/** Largest frame a ring link accepts (the WebSocket maxPayload). */
export const MAX_FRAME_BYTES = DEFAULT_CHUNK_BYTES + FRAME_HEADER_SLACK;
/** Largest chunk payload a sender may use so that its frames fit MAX_FRAME_BYTES. */
export const MAX_CHUNK_BYTES = MAX_FRAME_BYTES - CHUNK_HEADER_BYTES;

const LITTLE_ENDIAN_HOST = endianness() === "LE";

const u32 = z.number().int().min(0).max(0xffffffff);
const rank = z.number().int().min(0).max(0xffff);

export const HelloSchema = z
  .object({
    t: z.literal("hello"),
    job: z.string().min(1).max(256),
    secret: z.string().min(1).max(1024),
    from: rank,
    to: rank,
  })
  .strict();

export const OpSchema = z
  .object({
    t: z.literal("op"),
    op: u32,
    count: u32,
    dtype: z.literal("float32"),
  })
  .strict();

export const ControlSchema = z.discriminatedUnion("t", [HelloSchema, OpSchema]);

export type HelloMessage = z.infer<typeof HelloSchema>;
export type OpMessage = z.infer<typeof OpSchema>;
export type ControlMessage = HelloMessage | OpMessage;

export interface ChunkHeader {
  /** 0 .. 2(N-1)-1 */
  phase: number;
  op: number;
  /** index of the chunk within its phase */
  chunk: number;
  /** first element, index into the whole buffer */
  offset: number;
  /** number of elements */
  count: number;
}

export interface ChunkFrame extends ChunkHeader {
  kind: "chunk";
  dtype: "float32";
  /** `count` values; a view of the received bytes when aligned, else a copy. */
  data: Float32Array;
}

export interface ControlFrame {
  kind: "control";
  msg: ControlMessage;
}

export type Frame = ControlFrame | ChunkFrame;

/** Byte length of a tensor chunk frame carrying `count` float32 values. */
export function chunkFrameBytes(count: number): number {
  return CHUNK_HEADER_BYTES + count * 4;
}

function describeIssues(err: z.ZodError): string {
  return err.issues
    .map((i) => `${i.path.length > 0 ? i.path.join(".") : "(root)"}: ${i.message}`)
    .join("; ");
}

export function encodeControl(msg: ControlMessage): Uint8Array {
  const parsed = ControlSchema.safeParse(msg);
  if (!parsed.success) {
    throw new Error(`refusing to encode invalid control frame: ${describeIssues(parsed.error)}`);
  }
  const body = msgpackEncode(parsed.data);
  const out = new Uint8Array(1 + body.byteLength);
  out[0] = FRAME_CONTROL;
  out.set(body, 1);
  return out;
}

/**
 * Encode a tensor chunk; `data` holds exactly `header.count` values (usually a
 * subarray of the buffer being reduced). The values are copied once, into the frame.
 */
export function encodeChunk(header: ChunkHeader, data: Float32Array): Uint8Array {
  const { phase, op, chunk, offset, count } = header;
  if (data.length !== count) {
    throw new Error(`chunk data has ${data.length} elements, header says ${count}`);
  }
  if (!Number.isInteger(phase) || phase < 0 || phase > 0xffff) throw new Error(`bad chunk phase ${phase}`);
  for (const [name, v] of [
    ["op", op],
    ["chunk", chunk],
    ["offset", offset],
    ["count", count],
  ] as const) {
    if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new Error(`bad chunk ${name} ${v}`);
  }
  const out = new Uint8Array(CHUNK_HEADER_BYTES + count * 4);
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  view.setUint8(0, FRAME_CHUNK);
  view.setUint8(1, DTYPE_FLOAT32);
  view.setUint16(2, phase, true);
  view.setUint32(4, op, true);
  view.setUint32(8, chunk, true);
  view.setUint32(12, offset, true);
  view.setUint32(16, count, true);
  view.setUint32(20, 0, true);
  if (LITTLE_ENDIAN_HOST) {
    out.set(new Uint8Array(data.buffer, data.byteOffset, count * 4), CHUNK_HEADER_BYTES);
  } else {
    for (let i = 0; i < count; i++) view.setFloat32(CHUNK_HEADER_BYTES + i * 4, data[i], true);
  }
  return out;
}

/** Decode and validate one frame. Throws ProtocolError on anything malformed. */
export function decodeFrame(bytes: Uint8Array): Frame {
  if (bytes.byteLength === 0) throw new ProtocolError("empty ring frame");
  const kind = bytes[0];
  if (kind === FRAME_CONTROL) return decodeControl(bytes);
  if (kind === FRAME_CHUNK) return decodeChunk(bytes);
  throw new ProtocolError(
    `unknown ring frame kind 0x${kind.toString(16).padStart(2, "0")} (expected 0x01 control or 0x02 tensor chunk)`,
  );
}

function decodeControl(bytes: Uint8Array): ControlFrame {
  let value: unknown;
  try {
    value = msgpackDecode(bytes.subarray(1));
  } catch (err) {
    throw new ProtocolError(
      `control frame is not valid msgpack: ${err instanceof Error ? err.message : String(err)}`,
    );
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ProtocolError("control frame is not a msgpack map");
  }
  const parsed = ControlSchema.safeParse(value);
  if (!parsed.success) {
    const t = (value as { t?: unknown }).t;
    const what = typeof t === "string" ? `"${t.slice(0, 32)}" ` : "";
    throw new ProtocolError(`invalid ${what}control frame: ${describeIssues(parsed.error)}`);
  }
  return { kind: "control", msg: parsed.data };
}

function decodeChunk(bytes: Uint8Array): ChunkFrame {
  if (bytes.byteLength < CHUNK_HEADER_BYTES) {
    throw new ProtocolError(
      `tensor chunk too short: ${bytes.byteLength} bytes, the header alone is ${CHUNK_HEADER_BYTES}`,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const dtype = view.getUint8(1);
  if (dtype !== DTYPE_FLOAT32) {
    throw new ProtocolError(`tensor chunk has unknown dtype code ${dtype} (expected 1 = float32)`);
  }
  const phase = view.getUint16(2, true);
  const op = view.getUint32(4, true);
  const chunk = view.getUint32(8, true);
  const offset = view.getUint32(12, true);
  const count = view.getUint32(16, true);
  const reserved = view.getUint32(20, true);
  if (reserved !== 0) {
    throw new ProtocolError(`tensor chunk reserved field is ${reserved}, must be 0`);
  }
  const payload = bytes.byteLength - CHUNK_HEADER_BYTES;
  if (payload !== count * 4) {
    throw new ProtocolError(
      `tensor chunk payload is ${payload} bytes but count ${count} needs ${count * 4} (op ${op}, phase ${phase}, chunk ${chunk})`,
    );
  }
  const start = bytes.byteOffset + CHUNK_HEADER_BYTES;
  let data: Float32Array;
  if (LITTLE_ENDIAN_HOST && start % 4 === 0) {
    data = new Float32Array(bytes.buffer, start, count);
  } else if (LITTLE_ENDIAN_HOST) {
    data = new Float32Array(count);
    new Uint8Array(data.buffer).set(bytes.subarray(CHUNK_HEADER_BYTES));
  } else {
    data = new Float32Array(count);
    for (let i = 0; i < count; i++) data[i] = view.getFloat32(CHUNK_HEADER_BYTES + i * 4, true);
  }
  return { kind: "chunk", dtype: "float32", phase, op, chunk, offset, count, data };
}
