import { encode as msgpackEncode } from "@msgpack/msgpack";
import { describe, expect, it } from "vitest";
import { ProtocolError } from "../../src/errors.js";
import {
  BLOB_HEADER_BYTES,
  CHUNK_HEADER_BYTES,
  DEFAULT_CHUNK_BYTES,
  decodeFrame,
  encodeBlobChunk,
  encodeChunk,
  encodeCodedChunk,
  encodeControl,
  MAX_FRAME_BYTES,
  newChunkFrame,
  setFramePhase,
  wirePayloadBytes,
} from "../../src/protocol/frames.js";

function control(value: unknown): Uint8Array {
  const body = msgpackEncode(value);
  const out = new Uint8Array(body.length + 1);
  out[0] = 1;
  out.set(body, 1);
  return out;
}

function expectProtocolError(bytes: Uint8Array, message: RegExp): void {
  let caught: unknown;
  try {
    decodeFrame(bytes);
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(ProtocolError);
  expect((caught as Error).message).toMatch(message);
}

describe("data-plane frames", () => {
  it("has sane constants", () => {
    expect(DEFAULT_CHUNK_BYTES).toBe(256 * 1024);
    expect(MAX_FRAME_BYTES).toBeGreaterThanOrEqual(DEFAULT_CHUNK_BYTES + CHUNK_HEADER_BYTES);
  });

  it("round-trips hello and op control frames", () => {
    const hello = { t: "hello", job: "j1", from: 2, to: 3, epoch: 4, key: `ed25519:${"A".repeat(43)}`, nonce: new Uint8Array(32).fill(1), sig: new Uint8Array(64).fill(2), credential: { ranks: [2], sig: new Uint8Array(64).fill(3) } } as const;
    const op = { t: "op", op: 7, count: 1001, dtype: "float32" } as const;
    for (const msg of [hello, op]) {
      const bytes = encodeControl(msg);
      expect(bytes[0]).toBe(1);
      expect(decodeFrame(bytes)).toEqual({ kind: "control", msg });
    }
  });

  it("round-trips tensor chunks, bit-exact, including odd values", () => {
    const data = new Float32Array([1.5, -0, NaN, Infinity, -3.25e-38, 1e30, 7]);
    const header = { phase: 3, op: 0xfffffffe, chunk: 9, offset: 123456, count: data.length };
    const bytes = encodeChunk(header, data);
    expect(bytes.byteLength).toBe(CHUNK_HEADER_BYTES + data.length * 4);
    const view = new DataView(bytes.buffer);
    expect(view.getUint8(0)).toBe(2);
    expect(view.getUint8(1)).toBe(1);
    expect(view.getUint16(2, true)).toBe(3);
    expect(view.getUint32(12, true)).toBe(123456);
    const frame = decodeFrame(bytes);
    expect(frame.kind).toBe("chunk");
    if (frame.kind !== "chunk") return;
    expect({ ...frame, data: undefined }).toEqual({ kind: "chunk", dtype: "float32", ...header, data: undefined });
    expect(new Uint8Array(frame.data.buffer, frame.data.byteOffset, frame.data.byteLength)).toEqual(
      new Uint8Array(data.buffer),
    );
    // aligned input: a view, no copy
    expect(frame.data.buffer).toBe(bytes.buffer);
  });

  it("decodes an unaligned chunk with one copy", () => {
    const data = new Float32Array([1, 2, 3]);
    const bytes = encodeChunk({ phase: 0, op: 0, chunk: 0, offset: 0, count: 3 }, data);
    const shifted = new Uint8Array(bytes.length + 1).subarray(1);
    shifted.set(bytes);
    const frame = decodeFrame(shifted);
    if (frame.kind !== "chunk") throw new Error("not a chunk");
    expect(Array.from(frame.data)).toEqual([1, 2, 3]);
    expect(frame.data.buffer).not.toBe(shifted.buffer);
  });

  it("round-trips an empty chunk", () => {
    const frame = decodeFrame(encodeChunk({ phase: 0, op: 1, chunk: 0, offset: 5, count: 0 }, new Float32Array(0)));
    expect(frame).toMatchObject({ kind: "chunk", count: 0, offset: 5 });
  });

  it("rejects a truncated chunk header", () => {
    const bytes = encodeChunk({ phase: 0, op: 0, chunk: 0, offset: 0, count: 2 }, new Float32Array(2));
    expectProtocolError(bytes.subarray(0, 10), /too short: 10 bytes.*header alone is 24/);
  });

  it("rejects a payload whose length is not count x 4", () => {
    const bytes = encodeChunk({ phase: 0, op: 0, chunk: 0, offset: 0, count: 4 }, new Float32Array(4));
    expectProtocolError(bytes.subarray(0, bytes.length - 4), /payload is 12 bytes but count 4 needs 16/);
    const longer = new Uint8Array(bytes.length + 2);
    longer.set(bytes);
    expectProtocolError(longer, /payload is 18 bytes but count 4 needs 16/);
  });

  it("rejects a bad dtype code and a non-zero reserved field", () => {
    const bytes = encodeChunk({ phase: 0, op: 0, chunk: 0, offset: 0, count: 1 }, new Float32Array(1));
    const badDtype = bytes.slice();
    badDtype[1] = 6; // 2..5 are float16, bfloat16, int8 and int4 now
    expectProtocolError(badDtype, /unknown dtype code 6/);
    badDtype[1] = 0;
    expectProtocolError(badDtype, /unknown dtype code 0/);
    const reserved = bytes.slice();
    reserved[20] = 1;
    expectProtocolError(reserved, /reserved field is 1/);
  });

  it("rejects unknown kinds and empty frames", () => {
    expectProtocolError(new Uint8Array([0x07, 1, 2, 3]), /unknown ring frame kind 0x07/);
    expectProtocolError(new Uint8Array(0), /empty ring frame/);
  });

  it("rejects invalid control frames", () => {
    expectProtocolError(new Uint8Array([1, 0xc1]), /not valid msgpack/);
    expectProtocolError(control([1, 2]), /not a msgpack map/);
    expectProtocolError(control({ t: "nope" }), /invalid "nope" control frame/);
    expectProtocolError(control({ t: "op", op: 1, count: 10, dtype: "float16" }), /invalid "op" control frame: dtype/);
    expectProtocolError(control({ t: "op", op: -1, count: 10, dtype: "float32" }), /op:/);
    expectProtocolError(control({ t: "op", op: 1, count: 1.5, dtype: "float32" }), /count:/);
    expectProtocolError(control({ t: "hello", job: "j", from: 0 }), /invalid "hello" control frame: to/);
    expectProtocolError(
      control({ t: "hello", job: "j", secret: "the old shared secret", from: 0, to: 1 }),
      /Unrecognized key/,
    );
  });

  it("refuses to encode invalid control messages", () => {
    expect(() => encodeControl({ t: "op", op: 1, count: -1, dtype: "float32" })).toThrow(/invalid control frame/);
  });
});

describe("coded tensor chunks", () => {
  const header = { phase: 2, op: 5, chunk: 1, offset: 1000, count: 300 };

  it("carry the codec in the dtype byte and an exact payload", () => {
    for (const [codec, dtype, name, bytes] of [
      ["f16", 2, "float16", 600],
      ["bf16", 3, "bfloat16", 600],
      ["int8", 4, "int8", 8 + 300],
      ["int4", 5, "int4", 5 * 4 + 150],
    ] as const) {
      expect(wirePayloadBytes(codec, 300)).toBe(bytes);
      // positive finite scales, int8 values other than -128, int4 nibbles other than -8
      const payload = new Uint8Array(bytes).map((_, i) => (i * 7) & (codec === "int4" ? 0x77 : 0x7f));
      const frame = encodeCodedChunk(header, codec, payload);
      expect(frame.byteLength).toBe(CHUNK_HEADER_BYTES + bytes);
      expect(frame[0]).toBe(2);
      expect(frame[1]).toBe(dtype);
      const decoded = decodeFrame(frame);
      expect(decoded).toMatchObject({ kind: "chunk", dtype: name, codec, ...header });
      if (decoded.kind !== "chunk" || decoded.dtype === "float32") throw new Error("not a coded chunk");
      expect(Array.from(decoded.payload)).toEqual(Array.from(payload));
      expect(newChunkFrame(header, codec).byteLength).toBe(frame.byteLength);
    }
  });

  it("rejects a payload of the wrong length for its codec", () => {
    const f16 = encodeCodedChunk(header, "f16", new Uint8Array(600));
    expectProtocolError(f16.subarray(0, f16.length - 2), /payload is 598 bytes but count 300 needs 600 as float16/);
    // int8 with one scale too few: 257 values need 2 scales
    const h257 = { ...header, count: 257 };
    const short = new Uint8Array(CHUNK_HEADER_BYTES + 4 + 257);
    short.set(newChunkFrame(h257, "int8").subarray(0, CHUNK_HEADER_BYTES));
    expectProtocolError(short, /payload is 261 bytes but count 257 needs 2 scales \+ 257 int8 values = 265 as int8/);
  });

  it("rejects int8 scales that are negative or infinite, and the value -128", () => {
    const frame = newChunkFrame({ ...header, count: 10 }, "int8");
    const view = new DataView(frame.buffer);
    view.setFloat32(CHUNK_HEADER_BYTES, 0.5, true);
    expect(decodeFrame(frame)).toMatchObject({ codec: "int8", count: 10 });
    view.setFloat32(CHUNK_HEADER_BYTES, NaN, true); // a non-finite block: allowed
    expect(decodeFrame(frame)).toMatchObject({ codec: "int8" });
    view.setFloat32(CHUNK_HEADER_BYTES, -1, true);
    expectProtocolError(frame, /bad scale -1 in block 0/);
    view.setFloat32(CHUNK_HEADER_BYTES, Infinity, true);
    expectProtocolError(frame, /bad scale Infinity/);
    view.setFloat32(CHUNK_HEADER_BYTES, 1, true);
    frame[CHUNK_HEADER_BYTES + 4 + 3] = 0x80;
    expectProtocolError(frame, /value -128 at element 3/);
  });

  it("rejects int4 payloads of the wrong length, bad scales, the value -8 and a non-zero padding nibble", () => {
    // 65 values need 2 scales and 33 bytes
    const h65 = { ...header, count: 65 };
    expect(wirePayloadBytes("int4", 65)).toBe(41);
    const short = new Uint8Array(CHUNK_HEADER_BYTES + 4 + 33);
    short.set(newChunkFrame(h65, "int4").subarray(0, CHUNK_HEADER_BYTES));
    expectProtocolError(short, /payload is 37 bytes but count 65 needs 2 scales \+ 33 bytes of int4 values = 41 as int4/);
    const frame = newChunkFrame(h65, "int4");
    const view = new DataView(frame.buffer);
    const q = CHUNK_HEADER_BYTES + 8;
    view.setFloat32(CHUNK_HEADER_BYTES, 0.5, true);
    frame[q] = 0x97; // 7, then -7
    frame[q + 32] = 0x07; // element 64, and the padding nibble 0
    expect(decodeFrame(frame)).toMatchObject({ codec: "int4", dtype: "int4", count: 65 });
    view.setFloat32(CHUNK_HEADER_BYTES + 4, NaN, true); // a non-finite block: allowed
    expect(decodeFrame(frame)).toMatchObject({ codec: "int4" });
    view.setFloat32(CHUNK_HEADER_BYTES + 4, -1, true);
    expectProtocolError(frame, /int4 chunk has bad scale -1 in block 1/);
    view.setFloat32(CHUNK_HEADER_BYTES + 4, Infinity, true);
    expectProtocolError(frame, /bad scale Infinity/);
    view.setFloat32(CHUNK_HEADER_BYTES + 4, 1, true);
    frame[q + 5] = 0x08;
    expectProtocolError(frame, /int4 chunk has value -8 at element 10/);
    frame[q + 5] = 0x81;
    expectProtocolError(frame, /int4 chunk has value -8 at element 11/);
    frame[q + 5] = 0;
    frame[q + 32] = 0x17;
    expectProtocolError(frame, /non-zero padding nibble after element 64/);
  });

  it("setFramePhase relabels a chunk without touching the rest", () => {
    const frame = encodeCodedChunk(header, "bf16", new Uint8Array(600).fill(9));
    setFramePhase(frame, 0x1234);
    expect(decodeFrame(frame)).toMatchObject({ phase: 0x1234, op: 5, chunk: 1, offset: 1000, count: 300 });
  });
});

describe("op control frames", () => {
  it("round-trip all-reduce ops with a codec and all-gather ops", () => {
    for (const msg of [
      { t: "op", op: 3, kind: "allreduce", count: 12, dtype: "float32", codec: "int8" },
      { t: "op", op: 3, kind: "allreduce", count: 12, dtype: "float32", codec: "int4" },
      { t: "op", op: 3, kind: "allgather", size: 0 },
      { t: "op", op: 0xffffffff, kind: "allgather", size: 123456 },
    ] as const) {
      expect(decodeFrame(encodeControl(msg))).toEqual({ kind: "control", msg });
    }
  });

  it("have a length that does not depend on the op number", () => {
    const len = (op: number) =>
      encodeControl({ t: "op", op, kind: "allreduce", count: 1000, dtype: "float32", codec: "f16" }).byteLength;
    for (const op of [0, 1, 127, 128, 255, 256, 65535, 65536, 0xffffffff]) expect(len(op)).toBe(len(0));
  });

  it("reject unknown codecs and mixed-up fields", () => {
    expectProtocolError(control({ t: "op", op: 1, count: 10, dtype: "float32", codec: "fp8" }), /codec/);
    expectProtocolError(control({ t: "op", op: 1, kind: "allgather", count: 10 }), /size: Required/);
    expectProtocolError(control({ t: "op", op: 1, kind: "allgather", size: 1, codec: "f16" }), /Unrecognized key/);
    expectProtocolError(control({ t: "op", op: 1, kind: "reduce", count: 1, dtype: "float32" }), /kind/);
    expectProtocolError(control({ t: "op", op: 1, kind: "allgather", size: -1 }), /size/);
  });
});

describe("blob chunks", () => {
  const header = { phase: 1, op: 9, owner: 3, total: 10, offset: 4, length: 5 };

  it("round-trip", () => {
    const data = new Uint8Array([1, 2, 3, 4, 5]);
    const frame = encodeBlobChunk(header, data);
    expect(frame.byteLength).toBe(BLOB_HEADER_BYTES + 5);
    expect(frame[0]).toBe(3);
    const decoded = decodeFrame(frame);
    expect(decoded).toMatchObject({ kind: "blob", ...header });
    if (decoded.kind !== "blob") throw new Error("not a blob");
    expect(Array.from(decoded.data)).toEqual([1, 2, 3, 4, 5]);
    expect(decodeFrame(encodeBlobChunk({ ...header, total: 0, offset: 0, length: 0 }, new Uint8Array(0)))).toMatchObject({
      kind: "blob",
      total: 0,
      length: 0,
    });
  });

  it("reject a wrong length, bytes past the total, a short header and a reserved byte", () => {
    const frame = encodeBlobChunk(header, new Uint8Array(5));
    expectProtocolError(frame.subarray(0, frame.length - 1), /payload is 4 bytes but its header says 5/);
    expectProtocolError(encodeBlobChunk({ ...header, offset: 6 }, new Uint8Array(5)), /bytes 6..11 run past the blob's 10 bytes/);
    expectProtocolError(frame.subarray(0, 20), /blob chunk too short/);
    const reserved = frame.slice();
    reserved[1] = 1;
    expectProtocolError(reserved, /reserved byte is 1/);
  });
});
