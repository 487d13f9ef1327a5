/**
 * Data-plane (ring) frames: see docs/protocol.md, "Data plane (ring)".
 *
 * Every binary WebSocket message on `/ring` is one frame; its first byte is the kind:
 * - 0x01 control: the rest is a msgpack map (`hello` or `op`), validated by schema;
 * - 0x02 tensor chunk: a fixed 24-byte little-endian header, then `count` values in the
 *   wire encoding its dtype byte names (1 float32, 2 float16, 3 bfloat16, 4 int8 blocks,
 *   5 int4 blocks);
 * - 0x03 blob chunk (all-gather of byte blobs): a fixed 24-byte little-endian header,
 *   then `length` raw bytes.
 *
 * `decodeFrame` validates everything and throws ProtocolError with a precise message.
 */
import { decode as msgpackDecode, encode as msgpackEncode } from "@msgpack/msgpack";
import { endianness } from "node:os";
import { z } from "zod";
import { ProtocolError } from "../errors.js";
import { credentialSchema, proofFields } from "./proofs.js";

export const FRAME_CONTROL = 0x01;
export const FRAME_CHUNK = 0x02;
export const FRAME_BLOB = 0x03;
/** dtype codes of a tensor chunk: the wire encoding of its values. */
export const DTYPE_FLOAT32 = 1;
export const DTYPE_FLOAT16 = 2;
export const DTYPE_BFLOAT16 = 3;
export const DTYPE_INT8 = 4;
export const DTYPE_INT4 = 5;
export const CHUNK_HEADER_BYTES = 24;
export const BLOB_HEADER_BYTES = 24;
/** Default tensor payload per chunk frame: 256 KiB = 65536 float32 values. */
export const DEFAULT_CHUNK_BYTES = 256 * 1024;
/** Room above the chunk payload for headers and control frames. */
export const FRAME_HEADER_SLACK = 64 * 1024;
/** Largest frame a ring link accepts (the WebSocket maxPayload). */
export const MAX_FRAME_BYTES = DEFAULT_CHUNK_BYTES + FRAME_HEADER_SLACK;
/** Largest chunk payload a sender may use so that its frames fit MAX_FRAME_BYTES. */
export const MAX_CHUNK_BYTES = MAX_FRAME_BYTES - CHUNK_HEADER_BYTES;
/** Elements per int8 quantisation block (one float32 scale each). */
export const INT8_BLOCK = 256;
/** Elements per int4 quantisation block (one float32 scale each). */
export const INT4_BLOCK = 64;

/**
 * How a tensor chunk's values travel. The buffer being reduced is always float32; the
 * codec only changes the wire bytes: f32 as is, f16 IEEE half, bf16 bfloat16 (both
 * round-to-nearest-even), int8 and int4 blockwise quantised (see wirePayloadBytes).
 */
export type WireCodec = "f32" | "f16" | "bf16" | "int8" | "int4";
export const WIRE_CODECS: readonly WireCodec[] = ["f32", "f16", "bf16", "int8", "int4"];

const CODEC_DTYPE: Record<WireCodec, number> = {
  f32: DTYPE_FLOAT32,
  f16: DTYPE_FLOAT16,
  bf16: DTYPE_BFLOAT16,
  int8: DTYPE_INT8,
  int4: DTYPE_INT4,
};
const DTYPE_CODEC: Record<number, WireCodec> = { 1: "f32", 2: "f16", 3: "bf16", 4: "int8", 5: "int4" };

/** dtype byte of a tensor chunk carrying `codec`. */
export function codecDtype(codec: WireCodec): number {
  return CODEC_DTYPE[codec];
}

/**
 * Exact wire payload bytes of a tensor chunk of `count` values:
 * f32 4 per value; f16 / bf16 2; int8 ceil(count / 256) float32 scales then `count` int8;
 * int4 ceil(count / 64) float32 scales then ceil(count / 2) bytes of packed 4-bit values.
 */
export function wirePayloadBytes(codec: WireCodec, count: number): number {
  switch (codec) {
    case "f32":
      return count * 4;
    case "f16":
    case "bf16":
      return count * 2;
    case "int8":
      return Math.ceil(count / INT8_BLOCK) * 4 + count;
    case "int4":
      return Math.ceil(count / INT4_BLOCK) * 4 + Math.ceil(count / 2);
  }
}

const LITTLE_ENDIAN_HOST = endianness() === "LE";

const u32 = z.number().int().min(0).max(0xffffffff);
const rank = z.number().int().min(0).max(0xffff);

/**
 * The first frame on a ring link: who opens it (rank `from` of `job`, for rank `to`), the
 * opener's proof on this TLS session (key, nonce, signature: src/identity/proof.ts), and the
 * coordinator's credential that this key stands for `from`.
 */
export const HelloSchema = z
  .object({
    t: z.literal("hello"),
    job: z.string().min(1).max(256),
    from: rank,
    to: rank,
    /** Which formation of the ring this connection belongs to (it re-forms when ranks leave). */
    epoch: u32.default(0),
    /**
     * Absent: the job's ring. Otherwise the group this link belongs to: a stage's ring of
     * replicas (`stage:S`) or a point-to-point pipe between consecutive stages (`pipe:A:B`).
     */
    group: z.string().regex(/^[a-z0-9:_-]{1,64}$/).optional(),
    key: proofFields.key,
    nonce: proofFields.nonce,
    sig: proofFields.sig,
    credential: credentialSchema,
  })
  .strict();

/**
 * Announces all-reduce number `op` of `count` float32 elements. `kind` absent means
 * "allreduce", `codec` absent means "f32" (this version always sends both).
 */
export const AllReduceOpSchema = z
  .object({
    t: z.literal("op"),
    op: u32,
    kind: z.literal("allreduce").optional(),
    count: u32,
    dtype: z.literal("float32"),
    codec: z.enum(["f32", "f16", "bf16", "int8", "int4"]).optional(),
  })
  .strict();

/** Announces all-gather number `op`; `size` is the sender's own blob length in bytes. */
export const AllGatherOpSchema = z
  .object({
    t: z.literal("op"),
    op: u32,
    kind: z.literal("allgather"),
    size: u32,
  })
  .strict();

/**
 * Announces point-to-point message number `op` on a pipe link (pipeline stages): `size`
 * bytes follow in blob chunks (phase 0, owner 0), delivered to the receiver's `tag`.
 */
export const PipeOpSchema = z
  .object({
    t: z.literal("op"),
    op: u32,
    kind: z.literal("pipe"),
    tag: z.string().regex(/^[A-Za-z0-9:._-]{1,128}$/),
    size: u32,
  })
  .strict();

/** Kept under its old name: the all-reduce announcement. */
export const OpSchema = AllReduceOpSchema;

export const ControlSchema = z.union([HelloSchema, AllReduceOpSchema, AllGatherOpSchema, PipeOpSchema]);

export type HelloMessage = z.infer<typeof HelloSchema>;
export type AllReduceOpMessage = z.infer<typeof AllReduceOpSchema>;
export type AllGatherOpMessage = z.infer<typeof AllGatherOpSchema>;
export type PipeOpMessage = z.infer<typeof PipeOpSchema>;
export type OpMessage = AllReduceOpMessage | AllGatherOpMessage | PipeOpMessage;
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

/** A float32 chunk (dtype 1), as before codecs existed. */
export interface Float32ChunkFrame extends ChunkHeader {
  kind: "chunk";
  dtype: "float32";
  /** `count` values; a view of the received bytes when aligned, else a copy. */
  data: Float32Array;
}

/** A chunk in a compressed wire encoding (dtype 2, 3, 4 or 5). */
export interface CodedChunkFrame extends ChunkHeader {
  kind: "chunk";
  dtype: "float16" | "bfloat16" | "int8" | "int4";
  codec: Exclude<WireCodec, "f32">;
  /** exactly wirePayloadBytes(codec, count) bytes: a view of the received frame */
  payload: Uint8Array;
}

export type ChunkFrame = Float32ChunkFrame | CodedChunkFrame;

export interface BlobHeader {
  /** 0 .. N-2 */
  phase: number;
  op: number;
  /** rank whose blob this is */
  owner: number;
  /** the whole blob's length in bytes */
  total: number;
  /** first byte of this chunk within the blob */
  offset: number;
  /** bytes in this chunk */
  length: number;
}

export interface BlobChunkFrame extends BlobHeader {
  kind: "blob";
  /** `length` bytes: a view of the received frame */
  data: Uint8Array;
}

export interface ControlFrame {
  kind: "control";
  msg: ControlMessage;
}

export type Frame = ControlFrame | ChunkFrame | BlobChunkFrame;

/** The codec of a decoded tensor chunk. */
export function chunkCodec(frame: ChunkFrame): WireCodec {
  return frame.dtype === "float32" ? "f32" : frame.codec;
}

/** Byte length of a tensor chunk frame carrying `count` values in `codec` (default f32). */
export function chunkFrameBytes(count: number, codec: WireCodec = "f32"): number {
  return CHUNK_HEADER_BYTES + wirePayloadBytes(codec, count);
}

/** Byte length of a blob chunk frame carrying `length` bytes. */
export function blobFrameBytes(length: number): number {
  return BLOB_HEADER_BYTES + length;
}

function describeIssues(err: z.ZodError): string {
  return err.issues
    .map((i) => `${i.path.length > 0 ? i.path.join(".") : "(root)"}: ${i.message}`)
    .join("; ");
}

type ParseResult = { success: true; data: ControlMessage } | { success: false; error: string };

/** Validate a control message, choosing the schema by `t` (and `kind` for ops). */
function parseControl(value: object): ParseResult {
  const { t, kind } = value as { t?: unknown; kind?: unknown };
  let result: z.SafeParseReturnType<unknown, ControlMessage>;
  if (t === "hello") result = HelloSchema.safeParse(value);
  else if (t === "op" && kind === "allgather") result = AllGatherOpSchema.safeParse(value);
  else if (t === "op" && kind === "pipe") result = PipeOpSchema.safeParse(value);
  else if (t === "op") result = AllReduceOpSchema.safeParse(value);
  else return { success: false, error: `t: expected "hello" or "op"` };
  return result.success ? { success: true, data: result.data } : { success: false, error: describeIssues(result.error) };
}

const textEncoder = new TextEncoder();

/**
 * msgpack body of an op frame: a map whose `op` value is always a 5-byte uint32
 * (0xce + 4 bytes), so the frame's length does not depend on the op number and
 * expected byte counts are exact for every op. Any msgpack decoder reads it.
 */
function encodeOpBody(msg: OpMessage): Uint8Array {
  const entries = Object.entries(msg).filter(([, v]) => v !== undefined);
  const parts: Uint8Array[] = [new Uint8Array([0x80 | entries.length])];
  for (const [key, value] of entries) {
    const k = textEncoder.encode(key);
    parts.push(new Uint8Array([0xa0 | k.length]), k);
    if (key === "op") {
      const b = new Uint8Array(5);
      b[0] = 0xce;
      new DataView(b.buffer).setUint32(1, value as number, false);
      parts.push(b);
    } else {
      parts.push(msgpackEncode(value));
    }
  }
  return concatBytes(parts);
}

/** `parts` joined into a fresh array of its own (not a view into a pooled buffer). */
export function concatBytes(parts: Uint8Array[], total = parts.reduce((n, p) => n + p.byteLength, 0)): Uint8Array {
  const out = new Uint8Array(total);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.byteLength;
  }
  return out;
}

export function encodeControl(msg: ControlMessage): Uint8Array {
  const parsed = parseControl(msg);
  if (!parsed.success) {
    throw new Error(`refusing to encode invalid control frame: ${parsed.error}`);
  }
  const body = parsed.data.t === "op" ? encodeOpBody(parsed.data) : msgpackEncode(parsed.data);
  const out = new Uint8Array(1 + body.byteLength);
  out[0] = FRAME_CONTROL;
  out.set(body, 1);
  return out;
}

function checkHeaderFields(what: string, fields: Array<readonly [string, number]>): void {
  for (const [name, v] of fields) {
    if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new Error(`bad ${what} ${name} ${v}`);
  }
}

function writeChunkHeader(out: Uint8Array, header: ChunkHeader, codec: WireCodec): void {
  const { phase, op, chunk, offset, count } = header;
  if (!Number.isInteger(phase) || phase < 0 || phase > 0xffff) throw new Error(`bad chunk phase ${phase}`);
  checkHeaderFields("chunk", [
    ["op", op],
    ["chunk", chunk],
    ["offset", offset],
    ["count", count],
  ]);
  const view = new DataView(out.buffer, out.byteOffset, CHUNK_HEADER_BYTES);
  view.setUint8(0, FRAME_CHUNK);
  view.setUint8(1, CODEC_DTYPE[codec]);
  view.setUint16(2, phase, true);
  view.setUint32(4, op, true);
  view.setUint32(8, chunk, true);
  view.setUint32(12, offset, true);
  view.setUint32(16, count, true);
  view.setUint32(20, 0, true);
}

/**
 * Encode a float32 tensor chunk; `data` holds exactly `header.count` values (usually a
 * subarray of the buffer being reduced). The values are copied once, into the frame.
 */
export function encodeChunk(header: ChunkHeader, data: Float32Array): Uint8Array {
  // Every byte is written: no zero-filling (a fresh buffer past Buffer's pool, so the
  // payload starts aligned).
  // A plain Uint8Array (a Buffer's slice() would share memory where callers expect a copy).
  const buf = Buffer.allocUnsafeSlow(chunkFrameBytes(header.count));
  return encodeChunkInto(new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength), header, data);
}

/**
 * encodeChunk into `out` (at least chunkFrameBytes(header.count) bytes, e.g. a reused send
 * buffer); returns the frame, a view of `out`'s first bytes.
 */
export function encodeChunkInto(out: Uint8Array, header: ChunkHeader, data: Float32Array): Uint8Array {
  const { count } = header;
  if (data.length !== count) {
    throw new Error(`chunk data has ${data.length} elements, header says ${count}`);
  }
  const bytes = chunkFrameBytes(count);
  if (out.byteLength < bytes) throw new RangeError(`a chunk of ${count} values needs ${bytes} bytes, the buffer has ${out.byteLength}`);
  const frame = out.byteLength === bytes ? out : out.subarray(0, bytes);
  writeChunkHeader(frame, header, "f32");
  if (LITTLE_ENDIAN_HOST) {
    frame.set(new Uint8Array(data.buffer, data.byteOffset, count * 4), CHUNK_HEADER_BYTES);
  } else {
    const view = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
    for (let i = 0; i < count; i++) view.setFloat32(CHUNK_HEADER_BYTES + i * 4, data[i], true);
  }
  return frame;
}

/**
 * A tensor chunk frame in `codec` with its header written and a zeroed payload of
 * exactly wirePayloadBytes(codec, count) bytes at CHUNK_HEADER_BYTES, for the caller to
 * fill (the payload starts 8-byte aligned in a fresh buffer).
 */
export function newChunkFrame(header: ChunkHeader, codec: WireCodec): Uint8Array {
  const out = new Uint8Array(CHUNK_HEADER_BYTES + wirePayloadBytes(codec, header.count));
  writeChunkHeader(out, header, codec);
  return out;
}

/** Encode a tensor chunk whose payload is already in wire form (`payload` is copied). */
export function encodeCodedChunk(header: ChunkHeader, codec: WireCodec, payload: Uint8Array): Uint8Array {
  const want = wirePayloadBytes(codec, header.count);
  if (payload.byteLength !== want) {
    throw new Error(`${codec} payload has ${payload.byteLength} bytes, count ${header.count} needs ${want}`);
  }
  const out = newChunkFrame(header, codec);
  out.set(payload, CHUNK_HEADER_BYTES);
  return out;
}

/** Encode a blob chunk: header then `data` (exactly header.length bytes), copied. */
export function encodeBlobChunk(header: BlobHeader, data: Uint8Array): Uint8Array {
  const { phase, op, owner, total, offset, length } = header;
  if (data.byteLength !== length) throw new Error(`blob chunk data has ${data.byteLength} bytes, header says ${length}`);
  if (!Number.isInteger(phase) || phase < 0 || phase > 0xffff) throw new Error(`bad blob phase ${phase}`);
  checkHeaderFields("blob chunk", [
    ["op", op],
    ["owner", owner],
    ["total", total],
    ["offset", offset],
    ["length", length],
  ]);
  const out = new Uint8Array(BLOB_HEADER_BYTES + length);
  const view = new DataView(out.buffer, out.byteOffset, BLOB_HEADER_BYTES);
  view.setUint8(0, FRAME_BLOB);
  view.setUint8(1, 0);
  view.setUint16(2, phase, true);
  view.setUint32(4, op, true);
  view.setUint32(8, owner, true);
  view.setUint32(12, total, true);
  view.setUint32(16, offset, true);
  view.setUint32(20, length, true);
  out.set(data, BLOB_HEADER_BYTES);
  return out;
}

/**
 * Rewrite the phase of an encoded tensor or blob chunk in place (both keep it as a u16
 * at byte 2): how received chunks are forwarded unchanged to the next phase.
 */
export function setFramePhase(frame: Uint8Array, phase: number): void {
  if (!Number.isInteger(phase) || phase < 0 || phase > 0xffff) throw new Error(`bad phase ${phase}`);
  frame[2] = phase & 0xff;
  frame[3] = phase >>> 8;
}

/** Decode and validate one frame. Throws ProtocolError on anything malformed. */
export function decodeFrame(bytes: Uint8Array): Frame {
  if (bytes.byteLength === 0) throw new ProtocolError("empty ring frame");
  const kind = bytes[0];
  if (kind === FRAME_CONTROL) return decodeControl(bytes);
  if (kind === FRAME_CHUNK) return decodeChunk(bytes);
  if (kind === FRAME_BLOB) return decodeBlob(bytes);
  throw new ProtocolError(
    `unknown ring frame kind 0x${kind.toString(16).padStart(2, "0")} (expected 0x01 control, 0x02 tensor chunk or 0x03 blob chunk)`,
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
  const parsed = parseControl(value);
  if (!parsed.success) {
    const t = (value as { t?: unknown }).t;
    const what = typeof t === "string" ? `"${t.slice(0, 32)}" ` : "";
    throw new ProtocolError(`invalid ${what}control frame: ${parsed.error}`);
  }
  return { kind: "control", msg: parsed.data };
}

const DTYPE_NAMES: Record<WireCodec, ChunkFrame["dtype"]> = {
  f32: "float32",
  f16: "float16",
  bf16: "bfloat16",
  int8: "int8",
  int4: "int4",
};

function decodeChunk(bytes: Uint8Array): ChunkFrame {
  if (bytes.byteLength < CHUNK_HEADER_BYTES) {
    throw new ProtocolError(
      `tensor chunk too short: ${bytes.byteLength} bytes, the header alone is ${CHUNK_HEADER_BYTES}`,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const dtype = view.getUint8(1);
  const codec = DTYPE_CODEC[dtype];
  if (codec === undefined) {
    throw new ProtocolError(
      `tensor chunk has unknown dtype code ${dtype} (expected 1 = float32, 2 = float16, 3 = bfloat16, 4 = int8, 5 = int4)`,
    );
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
  const want = wirePayloadBytes(codec, count);
  if (payload !== want) {
    const how =
      codec === "int8"
        ? `${Math.ceil(count / INT8_BLOCK)} scales + ${count} int8 values = ${want}`
        : codec === "int4"
          ? `${Math.ceil(count / INT4_BLOCK)} scales + ${Math.ceil(count / 2)} bytes of int4 values = ${want}`
          : `${want}`;
    throw new ProtocolError(
      `tensor chunk payload is ${payload} bytes but count ${count} needs ${how}` +
        `${codec === "f32" ? "" : ` as ${DTYPE_NAMES[codec]}`} (op ${op}, phase ${phase}, chunk ${chunk})`,
    );
  }
  const start = bytes.byteOffset + CHUNK_HEADER_BYTES;
  if (codec !== "f32") {
    const body = bytes.subarray(CHUNK_HEADER_BYTES);
    if (codec === "int8") checkInt8Payload(body, count, op, phase, chunk);
    else if (codec === "int4") checkInt4Payload(body, count, op, phase, chunk);
    return { kind: "chunk", dtype: DTYPE_NAMES[codec] as CodedChunkFrame["dtype"], codec, phase, op, chunk, offset, count, payload: body };
  }
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

/** The first `blocks` float32 scales of a blockwise payload: NaN, or finite and >= 0. */
function checkScales(codec: "int8" | "int4", body: Uint8Array, blocks: number, op: number, phase: number, chunk: number): void {
  const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  for (let b = 0; b < blocks; b++) {
    const s = view.getFloat32(b * 4, true);
    if (!Number.isNaN(s) && !(s >= 0 && s < Infinity)) {
      throw new ProtocolError(`${codec} chunk has bad scale ${s} in block ${b} (op ${op}, phase ${phase}, chunk ${chunk})`);
    }
  }
}

/**
 * An int8 payload's scales must be NaN (the block held a non-finite value) or finite and
 * >= 0, and its values in [-127, 127] (-128 is never produced).
 */
function checkInt8Payload(body: Uint8Array, count: number, op: number, phase: number, chunk: number): void {
  const blocks = Math.ceil(count / INT8_BLOCK);
  checkScales("int8", body, blocks, op, phase, chunk);
  const q = body.subarray(blocks * 4);
  for (let i = 0; i < q.length; i++) {
    if (q[i] === 0x80) {
      throw new ProtocolError(`int8 chunk has value -128 at element ${i} (op ${op}, phase ${phase}, chunk ${chunk})`);
    }
  }
}

/**
 * An int4 payload's scales must be NaN or finite and >= 0 (as int8's), its values in
 * [-7, 7] (the nibble 0x8, -8, is never produced), and with an odd count the unused high
 * nibble of the last byte must be 0.
 */
function checkInt4Payload(body: Uint8Array, count: number, op: number, phase: number, chunk: number): void {
  const blocks = Math.ceil(count / INT4_BLOCK);
  checkScales("int4", body, blocks, op, phase, chunk);
  const q = body.subarray(blocks * 4);
  for (let j = 0; j < q.length; j++) {
    const byte = q[j];
    if ((byte & 0x0f) === 0x08 || (byte & 0xf0) === 0x80) {
      const i = 2 * j + ((byte & 0x0f) === 0x08 ? 0 : 1);
      throw new ProtocolError(`int4 chunk has value -8 at element ${i} (op ${op}, phase ${phase}, chunk ${chunk})`);
    }
  }
  if (count % 2 === 1 && (q[q.length - 1] & 0xf0) !== 0) {
    throw new ProtocolError(`int4 chunk has a non-zero padding nibble after element ${count - 1} (op ${op}, phase ${phase}, chunk ${chunk})`);
  }
}

function decodeBlob(bytes: Uint8Array): BlobChunkFrame {
  if (bytes.byteLength < BLOB_HEADER_BYTES) {
    throw new ProtocolError(
      `blob chunk too short: ${bytes.byteLength} bytes, the header alone is ${BLOB_HEADER_BYTES}`,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const reserved = view.getUint8(1);
  if (reserved !== 0) throw new ProtocolError(`blob chunk reserved byte is ${reserved}, must be 0`);
  const phase = view.getUint16(2, true);
  const op = view.getUint32(4, true);
  const owner = view.getUint32(8, true);
  const total = view.getUint32(12, true);
  const offset = view.getUint32(16, true);
  const length = view.getUint32(20, true);
  const payload = bytes.byteLength - BLOB_HEADER_BYTES;
  if (payload !== length) {
    throw new ProtocolError(
      `blob chunk payload is ${payload} bytes but its header says ${length} (op ${op}, phase ${phase}, owner ${owner})`,
    );
  }
  if (offset + length > total) {
    throw new ProtocolError(
      `blob chunk bytes ${offset}..${offset + length} run past the blob's ${total} bytes (op ${op}, phase ${phase}, owner ${owner})`,
    );
  }
  return { kind: "blob", phase, op, owner, total, offset, length, data: bytes.subarray(BLOB_HEADER_BYTES) };
}
