import { encode as msgpackEncode } from "@msgpack/msgpack";
import { describe, expect, it } from "vitest";
import { ProtocolError } from "../../src/errors.js";
import {
  CHUNK_HEADER_BYTES,
  DEFAULT_CHUNK_BYTES,
  decodeFrame,
  encodeChunk,
  encodeControl,
  MAX_FRAME_BYTES,
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
    const hello = { t: "hello", job: "j1", secret: "xyz", from: 2, to: 3 } as const;
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
    badDtype[1] = 2;
    expectProtocolError(badDtype, /unknown dtype code 2/);
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
    expectProtocolError(control({ t: "hello", job: "j", secret: "s", from: 0 }), /invalid "hello" control frame: to/);
    expectProtocolError(
      control({ t: "hello", job: "j", secret: "s", from: 0, to: 1, extra: true }),
      /Unrecognized key/,
    );
  });

  it("refuses to encode invalid control messages", () => {
    expect(() => encodeControl({ t: "op", op: 1, count: -1, dtype: "float32" })).toThrow(/invalid control frame/);
  });
});
