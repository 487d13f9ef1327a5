/**
 * Wire codecs of the ring all-reduce: how a chunk of a float32 buffer travels.
 * See docs/protocol.md, "Data plane (ring)", and `wirePayloadBytes` in protocol/frames.
 *
 * - f32: the float32 values, little-endian (exact).
 * - f16: IEEE 754 binary16, round-to-nearest-even; overflow becomes +-Inf, NaN stays NaN
 *   (as the quiet NaN 0x7e00), Inf stays Inf, tiny values become subnormals or +-0.
 * - bf16: bfloat16 (the top 16 bits of the float32), round-to-nearest-even; NaN becomes
 *   the quiet NaN 0x7fc0 (never rounds into Inf), values past the largest bfloat16 round
 *   to Inf as RNE says.
 * - int8: blocks of INT8_BLOCK (256) values counted from the chunk's first value. The
 *   payload is ceil(count / 256) float32 scales, then `count` int8 values. A block's
 *   scale is fround(absmax / 127) (0 for an all-zero block) and each value is
 *   round(x / scale) (half away from zero), clamped to [-127, 127]; decoding gives
 *   fround(q * scale). A block holding any NaN or +-Inf gets the scale NaN and decodes
 *   to all NaN, so a non-finite gradient on any worker makes the whole sum non-finite.
 * - int4: the same scheme with 4-bit values, for DiLoCo pseudo-gradients: blocks of
 *   INT4_BLOCK (64) values counted from the chunk's first value. The payload is
 *   ceil(count / 64) float32 scales, then ceil(count / 2) bytes holding two signed 4-bit
 *   values each (two's complement nibbles, the element at the even index in the low
 *   nibble; with an odd count the last high nibble is 0). A block's scale is
 *   fround(absmax / 7) (0 for an all-zero block), each value round(x / scale) (half away
 *   from zero) clamped to [-7, 7] (symmetric: -8 is never produced, 0 is exact); decoding
 *   gives fround(q * scale); NaN / Inf as for int8. About 0.5 + 4/64 = 0.5625 bytes per
 *   value. 64-value blocks (not 256): with only 15 levels the step is absmax/7, so a
 *   block's error follows its absmax closely; smaller blocks keep the scale near the
 *   local magnitude (and an outlier's damage local) for 3/64 byte more per value than
 *   256-value blocks would cost (on normal data the L2 error is about 15% lower than
 *   with 256-value blocks, 8% lower than with 128).
 *
 * All functions are deterministic (JavaScript double arithmetic, then one rounding to
 * float32), so decoding the same bytes gives the same bits on every host.
 */
import { endianness } from "node:os";
import { INT4_BLOCK, INT8_BLOCK, type WireCodec, wirePayloadBytes } from "../protocol/frames.js";
import { simdKernels } from "./simd.js";

export { INT4_BLOCK, INT8_BLOCK, type WireCodec, wirePayloadBytes } from "../protocol/frames.js";

const LITTLE_ENDIAN_HOST = endianness() === "LE";

/** Bytes per int8 block on the wire: its scale and its 256 values. */
const INT8_BLOCK_WIRE = INT8_BLOCK + 4;
/** Bytes per int4 block on the wire: its scale and its 64 values, two per byte. */
const INT4_BLOCK_WIRE = INT4_BLOCK / 2 + 4;

/**
 * Elements per chunk frame for `codec`, so that a full chunk carries at most
 * `chunkBytes` wire payload bytes: chunkBytes/4 for f32, chunkBytes/2 for f16 and bf16,
 * for int8 a whole number of 256-element blocks (at least one block, 260 bytes, even
 * when chunkBytes is smaller), for int4 a whole number of 64-element blocks (at least
 * one, 36 bytes).
 */
export function chunkElements(codec: WireCodec, chunkBytes: number): number {
  switch (codec) {
    case "f32":
      return Math.floor(chunkBytes / 4);
    case "f16":
    case "bf16":
      return Math.floor(chunkBytes / 2);
    case "int8":
      return Math.max(1, Math.floor(chunkBytes / INT8_BLOCK_WIRE)) * INT8_BLOCK;
    case "int4":
      return Math.max(1, Math.floor(chunkBytes / INT4_BLOCK_WIRE)) * INT4_BLOCK;
  }
}

// ---- scalar conversions -------------------------------------------------------------

const scratchF = new Float32Array(1);
const scratchU = new Uint32Array(scratchF.buffer);

/** float32 bit pattern (u32) -> binary16 bit pattern, round-to-nearest-even. */
function f16FromBits(x: number): number {
  const sign = (x >>> 16) & 0x8000;
  const a = x & 0x7fffffff;
  if (a >= 0x47800000) {
    // |x| >= 65536, Inf or NaN (65504 < |x| < 65536 rounds to Inf below, as RNE says)
    return sign | (a > 0x7f800000 ? 0x7e00 : 0x7c00);
  }
  if (a < 0x38800000) {
    // |x| < 2^-14: a binary16 subnormal (units of 2^-24) or zero
    const shift = 126 - (a >>> 23);
    if (shift > 24) return sign;
    const m = (a & 0x7fffff) | 0x800000;
    let q = m >>> shift;
    const rem = m & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (q & 1) === 1)) q++;
    return sign | q;
  }
  // normal: rebias the exponent, round the 13 dropped bits to nearest even (a carry
  // into the exponent is right, up to 0x7c00 = Inf)
  return sign | ((a - 0x38000000 + 0xfff + ((a >>> 13) & 1)) >>> 13);
}

/** float32 bit pattern (u32) -> bfloat16 bit pattern, round-to-nearest-even. */
function bf16FromBits(x: number): number {
  if ((x & 0x7fffffff) > 0x7f800000) return ((x >>> 16) & 0x8000) | 0x7fc0;
  return (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
}

/** binary16 bit pattern -> float32 bit pattern (exact). */
function f16ToBits(h: number): number {
  const sign = (h & 0x8000) << 16;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0x1f) return (sign | 0x7f800000 | (mant << 13)) >>> 0;
  if (exp !== 0) return (sign | ((exp + 112) << 23) | (mant << 13)) >>> 0;
  if (mant === 0) return sign >>> 0;
  // subnormal: mant x 2^-24, normalise
  let e = 113;
  let m = mant;
  while ((m & 0x400) === 0) {
    m <<= 1;
    e--;
  }
  return (sign | (e << 23) | ((m & 0x3ff) << 13)) >>> 0;
}

/** Round a number to float32 and return its binary16 bit pattern. */
export function f32ToF16Bits(x: number): number {
  scratchF[0] = x;
  return f16FromBits(scratchU[0]);
}

/** The float32 value of a binary16 bit pattern. */
export function f16BitsToF32(h: number): number {
  scratchU[0] = f16ToBits(h & 0xffff);
  return scratchF[0];
}

/** Round a number to float32 and return its bfloat16 bit pattern. */
export function f32ToBf16Bits(x: number): number {
  scratchF[0] = x;
  return bf16FromBits(scratchU[0]);
}

/** The float32 value of a bfloat16 bit pattern. */
export function bf16BitsToF32(h: number): number {
  scratchU[0] = (h & 0xffff) << 16;
  return scratchF[0];
}

// ---- decode tables (built on first use, 256 KiB each) --------------------------------

let f16Table: Float32Array | null = null;
let bf16Table: Float32Array | null = null;

function halfTable(codec: "f16" | "bf16"): Float32Array {
  if (codec === "f16") {
    if (!f16Table) {
      const t = new Float32Array(65536);
      const u = new Uint32Array(t.buffer);
      for (let h = 0; h < 65536; h++) u[h] = f16ToBits(h);
      f16Table = t;
    }
    return f16Table;
  }
  if (!bf16Table) {
    const t = new Float32Array(65536);
    const u = new Uint32Array(t.buffer);
    for (let h = 0; h < 65536; h++) u[h] = h << 16;
    bf16Table = t;
  }
  return bf16Table;
}

// ---- byte views ------------------------------------------------------------------------

/** u16 little-endian values of `bytes` (a view when aligned on an LE host, else a copy). */
function u16In(bytes: Uint8Array, count: number): Uint16Array {
  if (LITTLE_ENDIAN_HOST && bytes.byteOffset % 2 === 0) return new Uint16Array(bytes.buffer, bytes.byteOffset, count);
  const out = new Uint16Array(count);
  if (LITTLE_ENDIAN_HOST) {
    new Uint8Array(out.buffer).set(bytes.subarray(0, count * 2));
  } else {
    for (let i = 0; i < count; i++) out[i] = bytes[2 * i] | (bytes[2 * i + 1] << 8);
  }
  return out;
}

// ---- payload encode / decode -----------------------------------------------------------

/**
 * Encode `src` into `out`, which must hold exactly wirePayloadBytes(codec, src.length)
 * bytes (typically the payload of newChunkFrame). Int8 and int4 blocks start at src[0].
 */
export function encodePayload(codec: WireCodec, src: Float32Array, out: Uint8Array): void {
  const count = src.length;
  const want = wirePayloadBytes(codec, count);
  if (out.byteLength !== want) throw new RangeError(`${codec} payload of ${count} values needs ${want} bytes, got ${out.byteLength}`);
  if (count === 0) return;
  const bits = new Uint32Array(src.buffer, src.byteOffset, count);
  switch (codec) {
    case "f32":
      if (LITTLE_ENDIAN_HOST) {
        out.set(new Uint8Array(src.buffer, src.byteOffset, count * 4));
      } else {
        const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
        for (let i = 0; i < count; i++) view.setFloat32(i * 4, src[i], true);
      }
      return;
    case "f16":
    case "bf16": {
      const direct = LITTLE_ENDIAN_HOST && out.byteOffset % 2 === 0;
      const h = direct ? new Uint16Array(out.buffer, out.byteOffset, count) : new Uint16Array(count);
      if (codec === "f16") for (let i = 0; i < count; i++) h[i] = f16FromBits(bits[i]);
      else for (let i = 0; i < count; i++) h[i] = bf16FromBits(bits[i]);
      if (!direct) {
        for (let i = 0; i < count; i++) {
          out[2 * i] = h[i] & 0xff;
          out[2 * i + 1] = h[i] >>> 8;
        }
      }
      return;
    }
    case "int8":
      encodeInt8(src, out);
      return;
    case "int4":
      encodeInt4(src, out);
      return;
  }
}

/** An int8 payload: one float32 LE scale per block of INT8_BLOCK values, then the values. */
function int8Layout(bytes: Uint8Array, count: number): { blocks: number; scales: DataView; q: Int8Array } {
  const blocks = Math.ceil(count / INT8_BLOCK);
  return {
    blocks,
    scales: new DataView(bytes.buffer, bytes.byteOffset, blocks * 4),
    q: new Int8Array(bytes.buffer, bytes.byteOffset + blocks * 4, count),
  };
}

/**
 * The scale of block src[lo, hi) for values in [-qmax, qmax]: NaN if it holds a NaN or
 * +-Inf, 0 if it is all zero, else fround(absmax / qmax) (at least the smallest
 * subnormal: the clamp in `quantise` absorbs the rest).
 */
function blockScale(src: Float32Array, lo: number, hi: number, qmax: number): number {
  let amax = 0;
  for (let i = lo; i < hi; i++) {
    const v = src[i];
    const a = v < 0 ? -v : v;
    if (!(a < Infinity)) return NaN;
    if (a > amax) amax = a;
  }
  if (amax === 0) return 0;
  const scale = Math.fround(amax / qmax);
  return scale === 0 ? 2 ** -149 : scale;
}

/** round(v / scale), half away from zero, clamped to [-qmax, qmax] (scale > 0). */
function quantise(v: number, scale: number, qmax: number): number {
  const x = v / scale;
  const r = x < 0 ? -Math.round(-x) : Math.round(x);
  return r > qmax ? qmax : r < -qmax ? -qmax : r;
}

function encodeInt8(src: Float32Array, out: Uint8Array): void {
  const count = src.length;
  const { blocks, scales, q } = int8Layout(out, count);
  for (let b = 0; b < blocks; b++) {
    const lo = b * INT8_BLOCK;
    const hi = Math.min(count, lo + INT8_BLOCK);
    const scale = blockScale(src, lo, hi, 127);
    if (scale > 0) for (let i = lo; i < hi; i++) q[i] = quantise(src[i], scale, 127);
    else q.fill(0, lo, hi);
    scales.setFloat32(b * 4, scale, true);
  }
}

/**
 * An int4 payload: one float32 LE scale per block of INT4_BLOCK values, then the values
 * packed two per byte (element 2j in the low nibble of byte j, 2j+1 in the high one).
 */
function int4Layout(bytes: Uint8Array, count: number): { blocks: number; scales: DataView; q: Uint8Array } {
  const blocks = Math.ceil(count / INT4_BLOCK);
  return {
    blocks,
    scales: new DataView(bytes.buffer, bytes.byteOffset, blocks * 4),
    q: bytes.subarray(blocks * 4, blocks * 4 + Math.ceil(count / 2)),
  };
}

function encodeInt4(src: Float32Array, out: Uint8Array): void {
  const count = src.length;
  const { blocks, scales, q } = int4Layout(out, count);
  // INT4_BLOCK is even: every byte holds values of one block only
  for (let b = 0; b < blocks; b++) {
    const lo = b * INT4_BLOCK;
    const hi = Math.min(count, lo + INT4_BLOCK);
    const scale = blockScale(src, lo, hi, 7);
    if (scale > 0) {
      for (let i = lo; i < hi; i += 2) {
        const low = quantise(src[i], scale, 7) & 0x0f;
        const high = i + 1 < hi ? quantise(src[i + 1], scale, 7) & 0x0f : 0;
        q[i >>> 1] = low | (high << 4);
      }
    } else {
      q.fill(0, lo >>> 1, (hi + 1) >>> 1);
    }
    scales.setFloat32(b * 4, scale, true);
  }
}

/**
 * Decode a payload of `dst.length` values into `dst`: "set" overwrites (bit-exact: every
 * host decoding the same bytes gets the same bits), "add" adds the decoded float32
 * values. The payload must have been validated (decodeFrame does).
 */
export function decodePayload(codec: WireCodec, payload: Uint8Array, dst: Float32Array, mode: "set" | "add"): void {
  const count = dst.length;
  const want = wirePayloadBytes(codec, count);
  if (payload.byteLength !== want) throw new RangeError(`${codec} payload of ${count} values needs ${want} bytes, got ${payload.byteLength}`);
  if (count === 0) return;
  // The summation kernels: the same bits as the scalar code below, four lanes at a time.
  if (mode === "add" && simdKernels) {
    if (codec === "int8") return simdKernels.addInt8(dst, payload);
    if (codec === "f32" || codec === "f16" || codec === "bf16") {
      const done = codec === "f32" ? simdKernels.addF32(dst, payload) : simdKernels.addHalf(codec, dst, payload);
      if (done < count) decodeScalar(codec, payload.subarray(wirePayloadBytes(codec, done)), dst.subarray(done), mode);
      return;
    }
  }
  decodeScalar(codec, payload, dst, mode);
}

/** decodePayload without the SIMD kernels (the reference they are tested against). */
export function decodeScalar(codec: WireCodec, payload: Uint8Array, dst: Float32Array, mode: "set" | "add"): void {
  const count = dst.length;
  if (count === 0) return;
  switch (codec) {
    case "f32": {
      let src: Float32Array;
      if (LITTLE_ENDIAN_HOST && payload.byteOffset % 4 === 0) {
        src = new Float32Array(payload.buffer, payload.byteOffset, count);
      } else {
        src = new Float32Array(count);
        if (LITTLE_ENDIAN_HOST) new Uint8Array(src.buffer).set(payload);
        else {
          const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
          for (let i = 0; i < count; i++) src[i] = view.getFloat32(i * 4, true);
        }
      }
      if (mode === "set") dst.set(src);
      else for (let i = 0; i < count; i++) dst[i] += src[i];
      return;
    }
    case "f16":
    case "bf16": {
      const h = u16In(payload, count);
      const table = halfTable(codec);
      if (mode === "set") {
        const tu = new Uint32Array(table.buffer);
        const du = new Uint32Array(dst.buffer, dst.byteOffset, count);
        for (let i = 0; i < count; i++) du[i] = tu[h[i]];
      } else {
        for (let i = 0; i < count; i++) dst[i] += table[h[i]];
      }
      return;
    }
    case "int8":
      decodeInt8(payload, dst, mode);
      return;
    case "int4":
      decodeInt4(payload, dst, mode);
      return;
  }
}

function decodeInt8(payload: Uint8Array, dst: Float32Array, mode: "set" | "add"): void {
  const count = dst.length;
  const { blocks, scales, q } = int8Layout(payload, count);
  for (let b = 0; b < blocks; b++) {
    const lo = b * INT8_BLOCK;
    const hi = Math.min(count, lo + INT8_BLOCK);
    const scale = scales.getFloat32(b * 4, true);
    if (Number.isNaN(scale)) {
      dst.fill(NaN, lo, hi);
    } else if (mode === "set") {
      for (let i = lo; i < hi; i++) dst[i] = q[i] * scale;
    } else {
      for (let i = lo; i < hi; i++) dst[i] += Math.fround(q[i] * scale);
    }
  }
}

function decodeInt4(payload: Uint8Array, dst: Float32Array, mode: "set" | "add"): void {
  const count = dst.length;
  const { blocks, scales, q } = int4Layout(payload, count);
  for (let b = 0; b < blocks; b++) {
    const lo = b * INT4_BLOCK;
    const hi = Math.min(count, lo + INT4_BLOCK);
    const scale = scales.getFloat32(b * 4, true);
    if (Number.isNaN(scale)) {
      dst.fill(NaN, lo, hi);
      continue;
    }
    for (let i = lo; i < hi; i++) {
      const byte = q[i >>> 1];
      const n = (i & 1) === 0 ? byte & 0x0f : byte >>> 4;
      // sign-extend the nibble; the product is exact in double, stored once as float32
      const v = ((n ^ 8) - 8) * scale;
      if (mode === "set") dst[i] = v;
      else dst[i] += Math.fround(v);
    }
  }
}

/** Encode `src` to a fresh payload. */
export function encodeValues(codec: WireCodec, src: Float32Array): Uint8Array {
  const out = new Uint8Array(wirePayloadBytes(codec, src.length));
  encodePayload(codec, src, out);
  return out;
}

/** Decode a payload of `count` values to a fresh Float32Array. */
export function decodeValues(codec: WireCodec, payload: Uint8Array, count: number): Float32Array {
  const out = new Float32Array(count);
  decodePayload(codec, payload, out, "set");
  return out;
}

/** decode(encode(src)): the values `src` becomes after one trip over the wire. */
export function roundTrip(codec: WireCodec, src: Float32Array): Float32Array {
  return decodeValues(codec, encodeValues(codec, src), src.length);
}
