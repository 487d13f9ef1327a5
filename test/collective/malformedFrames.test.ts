/**
 * The malformed ring frames a hostile or broken neighbour can send mid all-reduce (the
 * cases probed for "Trust 1 of 3", which held up and must stay so): each one fails the
 * operation with an error, closes the link, and leaves the local buffer exactly as it was.
 */
import { encode } from "@msgpack/msgpack";
import { afterEach, describe, expect, it } from "vitest";
import { encodeBlobChunk, encodeChunk, encodeCodedChunk, encodeControl, FRAME_CONTROL, MAX_FRAME_BYTES } from "../../src/protocol/frames.js";
import { ringMember } from "../helpers/tls.js";
import { bitsEqual, closeAll, randomBuffer, startRing, waitClosed } from "./ringHarness.js";

afterEach(async () => {
  await closeAll();
});

const L = 1000;
/** What rank 0 of a 2-ring expects first from rank 1 for L elements: phase 0, chunk 0 of segment 1. */
const expected = { phase: 0, op: 0, chunk: 0, offset: 500, count: 500 };
const announce = encodeControl({ t: "op", op: 0, count: L, dtype: "float32" });
const ones = (n: number) => new Float32Array(n).fill(1);
const control = (value: unknown) => Uint8Array.from([FRAME_CONTROL, ...encode(value)]);
const withByte = (frame: Uint8Array, at: number, value: number) => {
  const out = frame.slice();
  out[at] = value;
  return out;
};
const good = encodeChunk(expected, ones(500));

/** [what, the frames the rogue neighbour sends] */
const CASES: [string, Uint8Array[]][] = [
  ["an empty frame", [announce, new Uint8Array(0)]],
  ["an unknown frame kind", [announce, Uint8Array.from([0x07, 1, 2, 3])]],
  ["a control frame that is not msgpack", [announce, Uint8Array.from([FRAME_CONTROL, 0xc1])]],
  ["a control frame that is not a map", [announce, control([1, 2, 3])]],
  ["a control frame of an unknown type", [announce, control({ t: "nope" })]],
  ["an op announcement with an extra key", [control({ t: "op", op: 0, count: L, dtype: "float32", extra: 1 })]],
  ["an op announcement of float64", [control({ t: "op", op: 0, count: L, dtype: "float64" })]],
  ["an op announcement with a negative count", [control({ t: "op", op: 0, count: -1, dtype: "float32" })]],
  ["an op announcement with an unknown codec", [control({ t: "op", op: 0, count: L, dtype: "float32", codec: "f8" })]],
  ["an op announcement with another element count", [encodeControl({ t: "op", op: 0, count: L + 1, dtype: "float32" })]],
  ["an op announcement with another codec", [encodeControl({ t: "op", op: 0, count: L, dtype: "float32", codec: "f16" })]],
  ["a second hello on an open link", [announce, encodeControl({ t: "hello", ...ringMember("j", [1]).hello(1, 0)(Buffer.alloc(32)) })]],
  ["a chunk before its op is announced", [good]],
  ["a truncated chunk header", [announce, good.subarray(0, 10)]],
  ["a chunk with an unknown dtype", [announce, withByte(good, 1, 9)]],
  ["a chunk with a non-zero reserved field", [announce, withByte(good, 20, 1)]],
  ["a chunk whose payload is shorter than its count", [announce, good.subarray(0, good.length - 4)]],
  ["a chunk one element short", [announce, encodeChunk({ ...expected, count: 499 }, ones(499))]],
  ["a chunk at another offset", [announce, encodeChunk({ ...expected, offset: 0 }, ones(500))]],
  ["a chunk of a phase the ring does not have", [announce, encodeChunk({ ...expected, phase: 9 }, ones(500))]],
  ["a chunk of another chunk index", [announce, encodeChunk({ ...expected, chunk: 3 }, ones(500))]],
  ["a chunk in another codec than announced", [announce, encodeCodedChunk(expected, "f16", new Uint8Array(1000))]],
  ["an int8 chunk with a negative scale", [encodeControl({ t: "op", op: 0, count: L, dtype: "float32", codec: "int8" }), int8WithScale(-1)]],
  ["an int4 chunk with the value -8", [encodeControl({ t: "op", op: 0, count: L, dtype: "float32", codec: "int4" }), int4WithMinus8()]],
  ["a blob chunk during an all-reduce", [announce, encodeBlobChunk({ phase: 0, op: 0, owner: 1, total: 4, offset: 0, length: 4 }, new Uint8Array(4))]],
  ["a frame over the size limit", [announce, encodeChunk({ ...expected, count: MAX_FRAME_BYTES / 4 }, ones(MAX_FRAME_BYTES / 4))]],
];

/** An int8 chunk for the expected place whose first block scale is `scale`. */
function int8WithScale(scale: number): Uint8Array {
  const payload = new Uint8Array(Math.ceil(500 / 256) * 4 + 500);
  new DataView(payload.buffer).setFloat32(0, scale, true);
  return encodeCodedChunk(expected, "int8", payload);
}

/** An int4 chunk for the expected place whose first value is the never-produced -8. */
function int4WithMinus8(): Uint8Array {
  const payload = new Uint8Array(Math.ceil(500 / 64) * 4 + 250);
  payload[Math.ceil(500 / 64) * 4] = 0x08;
  return encodeCodedChunk(expected, "int4", payload);
}

describe("malformed ring frames from a neighbour", () => {
  it("has the 23 probed cases and more", () => {
    expect(CASES.length).toBeGreaterThanOrEqual(23);
  });

  for (const [what, frames] of CASES) {
    it(`${what}: the op fails, the link closes, nothing is summed`, async () => {
      const h = await startRing(2, { manual: [1] });
      const buf = randomBuffer(L, 7);
      const before = buf.slice();
      const result = h.rings[0].allReduce(buf).then(
        () => null,
        (e: unknown) => e,
      );
      const rogue = h.nodes[1].next;
      for (const f of frames) await rogue.send(f).catch(() => {});
      const err = await result;
      expect(err).toBeInstanceOf(Error);
      expect((err as Error).message.length).toBeGreaterThan(0);
      expect(bitsEqual(buf, before)).toBe(true);
      await waitClosed(rogue.ws);
    });
  }
});
