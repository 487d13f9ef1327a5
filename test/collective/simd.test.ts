import { describe, expect, it } from "vitest";
import { decodePayload, decodeScalar, encodeValues } from "../../src/collective/codecs.js";
import { simdKernels } from "../../src/collective/simd.js";
import { wirePayloadBytes, type WireCodec } from "../../src/protocol/frames.js";

/** A deterministic generator (xorshift32), so a failure can be replayed. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** Float32 values of every kind: normals of wide range, subnormals, zeros, Inf, NaNs with payloads. */
function specials(n: number, next: () => number): Float32Array {
  const out = new Float32Array(n);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < n; i++) {
    const r = next() % 16;
    if (r === 0) bits[i] = next(); // any bit pattern: NaNs of every payload, signalling ones too
    else if (r === 1) bits[i] = (next() & 0x807fffff) >>> 0; // subnormal (or zero)
    else if (r === 2) bits[i] = next() & 1 ? 0x7f800000 : 0xff800000;
    else if (r === 3) bits[i] = (next() & 0x80000000) >>> 0; // +-0
    else out[i] = ((next() / 2 ** 32) * 2 - 1) * 2 ** ((next() % 60) - 30);
  }
  return out;
}

/** A random payload of `count` values in `codec`, starting at byte `shift` of a larger buffer. */
function payload(codec: WireCodec, count: number, shift: number, next: () => number): Uint8Array {
  const bytes = wirePayloadBytes(codec, count);
  const buf = new Uint8Array(bytes + shift).subarray(shift);
  if (codec === "int8") {
    // a valid payload: scales NaN, zero, subnormal or normal; values in [-127, 127]
    const enc = encodeValues("int8", specials(count, next));
    buf.set(enc);
    const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    const blocks = Math.ceil(count / 256);
    for (let b = 0; b < blocks; b++) if (next() % 4 === 0) view.setFloat32(b * 4, [NaN, 0, 1e-42, 3.5e-3][next() % 4], true);
    return buf;
  }
  for (let i = 0; i < bytes; i++) buf[i] = next() & 0xff;
  return buf;
}

/**
 * The first element where `a` and `b` differ in their bits, or null. Where both addends were
 * NaN (`bothNaN`) only NaN-ness must agree: which payload survives NaN + NaN is up to the
 * hardware's operand order, which neither JavaScript nor WebAssembly fixes (V8's optimising
 * compiler commutes the scalar addition: the scalar path itself gives either).
 */
const sameBits = (a: Float32Array, b: Float32Array, bothNaN: (i: number) => boolean) => {
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < ua.length; i++) {
    if (ua[i] === ub[i]) continue;
    if (bothNaN(i) && Number.isNaN(a[i]) && Number.isNaN(b[i])) continue;
    return `element ${i}: 0x${ua[i].toString(16)} != 0x${ub[i].toString(16)}`;
  }
  return null;
};

describe("WebAssembly SIMD summation kernels", () => {
  it("are available on this Node (else the ring silently runs the scalar path)", () => {
    expect(simdKernels).not.toBeNull();
  });

  // odd lengths, lengths around the kernels' multiples of 4 and 8 and their 32768-value pieces
  const lengths = [1, 3, 4, 7, 8, 9, 255, 256, 257, 1023, 4099, 32768, 32771, 65536 + 13, 70001];
  for (const codec of ["f32", "f16", "bf16", "int8"] as const) {
    it(`${codec}: dst += decode(payload) gives the scalar path's bits, NaN/Inf/subnormals, odd lengths, unaligned offsets`, () => {
      const next = rng(0x5eed + codec.length);
      for (const count of lengths) {
        for (const shift of [0, 1, 2, 3]) {
          const src = payload(codec, count, shift, next);
          const start = specials(count, next);
          // destinations at an odd element offset of their buffer (not 8- or 16-byte aligned)
          const viaSimd = new Float32Array(count + 1).subarray(1);
          const viaScalar = new Float32Array(count + 1).subarray(1);
          viaSimd.set(start);
          viaScalar.set(start);
          decodePayload(codec, src, viaSimd, "add");
          decodeScalar(codec, src, viaScalar, "add");
          const addend = new Float32Array(count);
          decodeScalar(codec, src, addend, "set");
          const diff = sameBits(viaSimd, viaScalar, (i) => Number.isNaN(start[i]) && Number.isNaN(addend[i]));
          expect(diff, `${codec} count ${count} shift ${shift}: ${diff}`).toBeNull();
        }
      }
    });
  }

  it("f32: sums of ordinary values are right (not just equal to the scalar path)", () => {
    const dst = Float32Array.from({ length: 1001 }, (_, i) => i);
    const src = Float32Array.from({ length: 1001 }, (_, i) => 0.5 * i);
    decodePayload("f32", new Uint8Array(src.buffer), dst, "add");
    expect(dst[0]).toBe(0);
    expect(dst[1000]).toBe(1500);
    expect(dst[999]).toBe(1498.5);
  });
});
