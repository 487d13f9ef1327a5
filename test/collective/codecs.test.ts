import { describe, expect, it } from "vitest";
import {
  bf16BitsToF32,
  chunkElements,
  decodePayload,
  decodeValues,
  encodePayload,
  encodeValues,
  f16BitsToF32,
  f32ToBf16Bits,
  f32ToF16Bits,
  roundTrip,
} from "../../src/collective/codecs.js";
import { DEFAULT_CHUNK_BYTES, INT4_BLOCK, INT8_BLOCK, wirePayloadBytes } from "../../src/protocol/frames.js";
import { randomBuffer } from "./ringHarness.js";

function bitsOf(x: number): number {
  return new Uint32Array(new Float32Array([x]).buffer)[0];
}
function fromBits(u: number): number {
  return new Float32Array(new Uint32Array([u >>> 0]).buffer)[0];
}

/** All finite non-negative binary16 values, ascending (bit patterns 0x0000 .. 0x7bff). */
const F16_POSITIVE = Array.from({ length: 0x7c00 }, (_, h) => f16BitsToF32(h));

/** Reference f32 -> f16 by search: nearest value, ties to the even bit pattern. */
function refF16(x: number): number {
  if (Number.isNaN(x)) return 0x7e00;
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  if (a >= 65520) return sign | 0x7c00;
  let lo = 0;
  let hi = F16_POSITIVE.length - 1;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (F16_POSITIVE[mid] <= a) lo = mid;
    else hi = mid;
  }
  const dl = a - F16_POSITIVE[lo];
  const dh = F16_POSITIVE[hi] - a;
  const pick = dl < dh ? lo : dh < dl ? hi : lo % 2 === 0 ? lo : hi;
  return sign | pick;
}

describe("f16", () => {
  it("encodes known values", () => {
    const cases: Array<[number, number]> = [
      [0, 0x0000],
      [-0, 0x8000],
      [1, 0x3c00],
      [-2, 0xc000],
      [0.5, 0x3800],
      [65504, 0x7bff], // largest finite
      [65519, 0x7bff], // just below the halfway point: rounds down
      [65520, 0x7c00], // halfway to 65536: ties to even = overflow = Inf
      [-65520, 0xfc00],
      [1e6, 0x7c00],
      [Infinity, 0x7c00],
      [-Infinity, 0xfc00],
      [2 ** -14, 0x0400], // smallest normal
      [2 ** -24, 0x0001], // smallest subnormal
      [1e-8, 0x0000], // below half the smallest subnormal: zero
      [-1e-8, 0x8000],
      [2 ** -25, 0x0000], // exactly half the smallest subnormal: tie to even (0)
      [3 * 2 ** -25, 0x0002], // 1.5 units: tie to even (2)
      [3e-8, 0x0001], // just above half a unit
      [1 + 2 ** -11, 0x3c00], // tie between 0x3c00 and 0x3c01: even
      [1 + 3 * 2 ** -11, 0x3c02], // tie between 0x3c01 and 0x3c02: even
      [2049, 0x6800], // tie between 2048 and 2050: 2048
      [2051, 0x6802], // tie between 2050 and 2052: 2052
      [65535, 0x7c00],
      [2 ** -14 - 2 ** -25, 0x0400], // rounds up from the largest subnormal into the normals
    ];
    for (const [x, h] of cases) expect([x, f32ToF16Bits(x).toString(16)]).toEqual([x, h.toString(16)]);
  });

  it("keeps NaN a NaN", () => {
    for (const bits of [0x7fc00000, 0x7f800001, 0xffffffff, 0x7fbfffff]) {
      const h = f32ToF16Bits(fromBits(bits));
      expect((h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0).toBe(true);
      expect(Number.isNaN(f16BitsToF32(h))).toBe(true);
    }
  });

  it("decodes every pattern exactly and re-encodes it to itself", () => {
    for (let h = 0; h < 65536; h++) {
      const x = f16BitsToF32(h);
      if (Number.isNaN(x)) {
        expect((h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0).toBe(true);
        continue;
      }
      expect(f32ToF16Bits(x)).toBe(h);
    }
    expect(f16BitsToF32(0x0001)).toBe(2 ** -24);
    expect(f16BitsToF32(0x03ff)).toBe(1023 * 2 ** -24);
    expect(f16BitsToF32(0x7bff)).toBe(65504);
    expect(f16BitsToF32(0xfc00)).toBe(-Infinity);
  });

  it("rounds to nearest even, matching a search over all half values", () => {
    let s = 12345;
    for (let k = 0; k < 200_000; k++) {
      s = (Math.imul(s, 1103515245) + 12345) >>> 0;
      // bit patterns concentrated around the half range, plus some anywhere
      const bits = k % 4 === 0 ? s : ((s & 0x80ffffff) | (((s >>> 24) % 36) + 97) << 23) >>> 0;
      const x = fromBits(bits);
      if (Number.isNaN(x)) continue;
      expect(f32ToF16Bits(x)).toBe(refF16(x));
    }
  });
});

describe("bf16", () => {
  it("encodes known values", () => {
    const cases: Array<[number, number]> = [
      [0, 0x0000],
      [-0, 0x8000],
      [1, 0x3f80],
      [-2, 0xc000],
      [Infinity, 0x7f80],
      [-Infinity, 0xff80],
      [fromBits(0x3f808000), 0x3f80], // tie: even
      [fromBits(0x3f818000), 0x3f82], // tie: even
      [fromBits(0x3f808001), 0x3f81],
      [fromBits(0x3f807fff), 0x3f80],
      [fromBits(0x7f7fffff), 0x7f80], // largest float32 rounds past the largest bfloat16: Inf
      [fromBits(0x7f7f7fff), 0x7f7f],
      [1e-8, 0x322c], // 0x322bcc77: tiny values keep their exponent; low half > 0x8000 rounds up
      [fromBits(0x00018000), 0x0002], // subnormal tie: even
    ];
    for (const [x, h] of cases) expect([x, f32ToBf16Bits(x).toString(16)]).toEqual([x, h.toString(16)]);
  });

  it("keeps NaN a NaN (never rounds it into Inf)", () => {
    for (const bits of [0x7fc00000, 0x7f800001, 0x7fffffff, 0xff800001]) {
      const h = f32ToBf16Bits(fromBits(bits));
      expect(Number.isNaN(bf16BitsToF32(h))).toBe(true);
    }
  });

  it("decodes every pattern exactly and re-encodes it to itself", () => {
    for (let h = 0; h < 65536; h++) {
      const x = bf16BitsToF32(h);
      expect(bitsOf(x) >>> 16).toBe(Number.isNaN(x) ? bitsOf(x) >>> 16 : h);
      if (!Number.isNaN(x)) expect(f32ToBf16Bits(x)).toBe(h);
    }
  });

  it("the relative error is at most 2^-8", () => {
    const xs = randomBuffer(10_000, 7);
    for (const x of xs) {
      if (x === 0) continue;
      expect(Math.abs(bf16BitsToF32(f32ToBf16Bits(x)) - x) / Math.abs(x)).toBeLessThanOrEqual(2 ** -8);
    }
  });
});

describe("payload encode/decode", () => {
  it("f16 and bf16 payloads are 2 bytes per value, little-endian, and decode bit-exactly", () => {
    const src = new Float32Array([1, -2, 65504, 65520, NaN, -Infinity, 1e-8, 0.1]);
    const f16 = encodeValues("f16", src);
    expect(f16.byteLength).toBe(16);
    expect([f16[0], f16[1], f16[2], f16[3]]).toEqual([0x00, 0x3c, 0x00, 0xc0]);
    const back = decodeValues("f16", f16, src.length);
    expect(Array.from(back.subarray(0, 4))).toEqual([1, -2, 65504, Infinity]);
    expect(Number.isNaN(back[4])).toBe(true);
    expect(back[5]).toBe(-Infinity);
    expect(back[6]).toBe(0);
    expect(back[7]).toBe(f16BitsToF32(f32ToF16Bits(0.1)));
    const bf = decodeValues("bf16", encodeValues("bf16", src), src.length);
    expect(bf[0]).toBe(1);
    expect(bf[3]).toBe(65536);
    expect(Number.isNaN(bf[4])).toBe(true);
  });

  it("decodes from an unaligned payload", () => {
    const src = randomBuffer(33, 3);
    for (const codec of ["f32", "f16", "bf16", "int8", "int4"] as const) {
      const enc = encodeValues(codec, src);
      const shifted = new Uint8Array(enc.byteLength + 1).subarray(1);
      shifted.set(enc);
      expect(Array.from(decodeValues(codec, shifted, src.length))).toEqual(Array.from(decodeValues(codec, enc, src.length)));
    }
  });

  it("add mode adds the decoded float32 values", () => {
    const src = randomBuffer(600, 4);
    for (const codec of ["f32", "f16", "bf16", "int8", "int4"] as const) {
      const dst = randomBuffer(600, 5);
      const want = dst.map((v, i) => v + roundTrip(codec, src)[i]);
      decodePayload(codec, encodeValues(codec, src), dst, "add");
      expect(Array.from(dst)).toEqual(Array.from(want));
    }
  });

  it("int8: scales first, then the values; blocks of 256 counted from the first value", () => {
    const src = new Float32Array(300);
    src[0] = 1;
    src[1] = -0.5;
    src[2] = 0.25;
    src[3] = 1 / 254; // exactly half a step: rounds away from zero
    src[4] = -1 / 254;
    // block 1 (elements 256..299): all zero
    const enc = encodeValues("int8", src);
    expect(enc.byteLength).toBe(2 * 4 + 300);
    expect(wirePayloadBytes("int8", 300)).toBe(308);
    const view = new DataView(enc.buffer);
    const scale = view.getFloat32(0, true);
    expect(scale).toBe(Math.fround(1 / 127));
    expect(view.getFloat32(4, true)).toBe(0);
    const q = new Int8Array(enc.buffer, 8, 300);
    expect(Array.from(q.subarray(0, 6))).toEqual([127, -64, 32, 1, -1, 0]);
    expect(q.subarray(256).every((v) => v === 0)).toBe(true);
    const back = decodeValues("int8", enc, 300);
    expect(back[0]).toBe(Math.fround(127 * scale));
    expect(back[1]).toBe(Math.fround(-64 * scale));
    expect(back.subarray(256).every((v) => v === 0)).toBe(true);
  });

  it("int8: error at most half a step (absmax/254) per block, and never -128", () => {
    const src = randomBuffer(5000, 6);
    for (let i = 0; i < src.length; i++) src[i] *= i < 2500 ? 1000 : 0.001; // blocks of very different scale
    const enc = encodeValues("int8", src);
    const back = decodeValues("int8", enc, src.length);
    const blocks = Math.ceil(src.length / INT8_BLOCK);
    expect(new Int8Array(enc.buffer, blocks * 4).every((v) => v >= -127 && v <= 127)).toBe(true);
    for (let b = 0; b < blocks; b++) {
      const lo = b * INT8_BLOCK;
      const hi = Math.min(src.length, lo + INT8_BLOCK);
      let amax = 0;
      for (let i = lo; i < hi; i++) amax = Math.max(amax, Math.abs(src[i]));
      for (let i = lo; i < hi; i++) {
        expect(Math.abs(back[i] - src[i])).toBeLessThanOrEqual((amax / 254) * (1 + 1e-6));
      }
    }
  });

  it("int8: a block with NaN or Inf decodes to all NaN, the other blocks are untouched", () => {
    for (const bad of [NaN, Infinity, -Infinity]) {
      const src = randomBuffer(700, 8);
      src[300] = bad;
      const enc = encodeValues("int8", src);
      expect(Number.isNaN(new DataView(enc.buffer).getFloat32(4, true))).toBe(true);
      const back = decodeValues("int8", enc, 700);
      for (let i = 0; i < 700; i++) {
        if (i >= 256 && i < 512) expect(Number.isNaN(back[i])).toBe(true);
        else expect(Number.isFinite(back[i])).toBe(true);
      }
    }
  });

  it("int8: tiny and huge blocks stay finite and sign-correct", () => {
    const src = new Float32Array([2 ** -149, -(2 ** -148), 3.4e38, -3.4e38]);
    const a = decodeValues("int8", encodeValues("int8", src.subarray(0, 2)), 2);
    expect(a[0]).toBeGreaterThanOrEqual(0);
    expect(a[1]).toBeLessThan(0);
    const b = decodeValues("int8", encodeValues("int8", src.subarray(2)), 2);
    expect(Number.isFinite(b[0]) && Number.isFinite(b[1])).toBe(true);
    expect(Math.abs(b[0] - 3.4e38) / 3.4e38).toBeLessThan(1e-6);
  });

  it("empty payloads", () => {
    for (const codec of ["f32", "f16", "bf16", "int8", "int4"] as const) {
      expect(encodeValues(codec, new Float32Array(0)).byteLength).toBe(0);
      expect(decodeValues(codec, new Uint8Array(0), 0).length).toBe(0);
    }
  });

  it("chunk element counts keep chunks within chunkBytes of wire bytes, int8 and int4 in whole blocks", () => {
    expect(chunkElements("f32", DEFAULT_CHUNK_BYTES)).toBe(65536);
    expect(chunkElements("f16", DEFAULT_CHUNK_BYTES)).toBe(131072);
    expect(chunkElements("bf16", DEFAULT_CHUNK_BYTES)).toBe(131072);
    const int8 = chunkElements("int8", DEFAULT_CHUNK_BYTES);
    expect(int8 % 256).toBe(0);
    expect(wirePayloadBytes("int8", int8)).toBeLessThanOrEqual(DEFAULT_CHUNK_BYTES);
    expect(wirePayloadBytes("int8", int8 + 256)).toBeGreaterThan(DEFAULT_CHUNK_BYTES);
    expect(chunkElements("int8", 4)).toBe(256); // at least one block
    const int4 = chunkElements("int4", DEFAULT_CHUNK_BYTES);
    expect(int4 % 64).toBe(0);
    expect(int4).toBe(Math.floor(DEFAULT_CHUNK_BYTES / 36) * 64);
    expect(wirePayloadBytes("int4", int4)).toBeLessThanOrEqual(DEFAULT_CHUNK_BYTES);
    expect(wirePayloadBytes("int4", int4 + 64)).toBeGreaterThan(DEFAULT_CHUNK_BYTES);
    expect(chunkElements("int4", 4)).toBe(64); // at least one block
    expect(chunkElements("int4", 36)).toBe(64);
    expect(chunkElements("int4", 72)).toBe(128);
  });
});

/** The signed 4-bit values of an int4 payload of `count` values (low nibble first). */
function int4Values(enc: Uint8Array, count: number): number[] {
  const q = enc.subarray(Math.ceil(count / INT4_BLOCK) * 4);
  return Array.from({ length: count }, (_, i) => {
    const n = i % 2 === 0 ? q[i >> 1] & 0x0f : q[i >> 1] >> 4;
    return n >= 8 ? n - 16 : n;
  });
}

describe("int4", () => {
  it("scales first, then two values per byte, low nibble first; blocks of 64 counted from the first value", () => {
    const src = new Float32Array(131); // blocks [0, 64), [64, 128), [128, 131)
    src[0] = 1;
    src[1] = -0.5;
    src[2] = 0.25;
    src[3] = 0.3; // 2.1 steps
    src[4] = -3 / 7;
    src[5] = -1;
    // block 1: all zero; block 2: ties at scale 1
    src.set([7, 2.5, -2.5], 128);
    const enc = encodeValues("int4", src);
    expect(wirePayloadBytes("int4", 131)).toBe(3 * 4 + 66);
    expect(enc.byteLength).toBe(78);
    const view = new DataView(enc.buffer);
    const scale = view.getFloat32(0, true);
    expect(scale).toBe(Math.fround(1 / 7));
    expect(view.getFloat32(4, true)).toBe(0);
    expect(view.getFloat32(8, true)).toBe(1);
    const q = int4Values(enc, 131);
    expect(q.slice(0, 7)).toEqual([7, -3, 2, 2, -3, -7, 0]);
    expect(q.slice(64, 128).every((v) => v === 0)).toBe(true);
    expect(q.slice(128)).toEqual([7, 3, -3]); // half away from zero
    expect(enc[12]).toBe(0xd7); // 7 | -3 << 4
    expect(enc[77] >> 4).toBe(0); // odd count: the last high nibble is padding, 0
    const back = decodeValues("int4", enc, 131);
    expect(back[0]).toBe(Math.fround(7 * scale));
    expect(back[1]).toBe(Math.fround(-3 * scale));
    expect(back.subarray(64, 128).every((v) => v === 0)).toBe(true);
    expect(Array.from(back.subarray(128))).toEqual([7, 3, -3]);
  });

  it("error at most half a step (absmax/14) per block, never -8, and a partial block at the end", () => {
    const src = randomBuffer(5001, 16);
    for (let i = 0; i < src.length; i++) src[i] *= i < 2500 ? 1000 : 0.001; // blocks of very different scale
    const enc = encodeValues("int4", src);
    const back = decodeValues("int4", enc, src.length);
    expect(int4Values(enc, src.length).every((v) => v >= -7 && v <= 7)).toBe(true);
    const blocks = Math.ceil(src.length / INT4_BLOCK);
    for (let b = 0; b < blocks; b++) {
      const lo = b * INT4_BLOCK;
      const hi = Math.min(src.length, lo + INT4_BLOCK);
      let amax = 0;
      for (let i = lo; i < hi; i++) amax = Math.max(amax, Math.abs(src[i]));
      for (let i = lo; i < hi; i++) {
        expect(Math.abs(back[i] - src[i])).toBeLessThanOrEqual((amax / 14) * (1 + 1e-6));
      }
      // the block's largest magnitude is encoded as +-7 steps
      const top = Math.max(...Array.from(back.subarray(lo, hi), Math.abs));
      expect(Math.abs(top - amax)).toBeLessThanOrEqual(amax * 2 ** -22);
    }
  });

  it("a block with NaN or Inf decodes to all NaN, the other blocks are untouched", () => {
    for (const bad of [NaN, Infinity, -Infinity]) {
      const src = randomBuffer(200, 18);
      src[100] = bad;
      const enc = encodeValues("int4", src);
      expect(Number.isNaN(new DataView(enc.buffer).getFloat32(4, true))).toBe(true);
      const back = decodeValues("int4", enc, 200);
      for (let i = 0; i < 200; i++) {
        if (i >= 64 && i < 128) expect(Number.isNaN(back[i])).toBe(true);
        else expect(Number.isFinite(back[i])).toBe(true);
      }
    }
  });

  it("tiny and huge blocks stay finite and sign-correct", () => {
    const src = new Float32Array([2 ** -149, -(2 ** -148), 3.4e38, -3.4e38]);
    const a = decodeValues("int4", encodeValues("int4", src.subarray(0, 2)), 2);
    expect(a[0]).toBeGreaterThanOrEqual(0);
    expect(a[1]).toBeLessThan(0);
    const b = decodeValues("int4", encodeValues("int4", src.subarray(2)), 2);
    expect(Number.isFinite(b[0]) && Number.isFinite(b[1])).toBe(true);
    expect(Math.abs(b[0] - 3.4e38) / 3.4e38).toBeLessThan(1e-6);
    expect(b[1]).toBe(-b[0]);
  });

  it("writes every payload byte, whatever the buffer held", () => {
    const src = randomBuffer(129, 19);
    src.fill(0, 64, 128); // one all-zero block
    const fresh = encodeValues("int4", src);
    const dirty = new Uint8Array(fresh.byteLength).fill(0xff);
    encodePayload("int4", src, dirty);
    expect(Array.from(dirty)).toEqual(Array.from(fresh));
  });

  it("about 0.5625 bytes per value, an eighth of the bytes of f32 plus the scales", () => {
    expect(wirePayloadBytes("int4", 64 * 1000)).toBe(36 * 1000);
    expect(wirePayloadBytes("int4", 1)).toBe(5);
    expect(wirePayloadBytes("int4", 65)).toBe(8 + 33);
  });
});
