/**
 * WebAssembly SIMD kernels for the ring's summation: dst += decode(payload) for f32, f16,
 * bf16 and int8 payloads, four float32 lanes at a time. Each gives the very bits the
 * scalar JavaScript path in codecs.ts gives (test/collective/simd.test.ts checks it, NaN,
 * Inf and subnormals included): every decode here is exact, and one float32 addition
 * (or one product, then one addition, for int8) rounds as JavaScript's double arithmetic
 * rounded once to float32 does.
 *
 * WebAssembly cannot reach a JavaScript buffer, so each call copies the destination and
 * the payload into the module's memory in pieces of PIECE values, runs the kernel and
 * copies the destination back: three memcpys of cache-resident data, cheaper than the
 * scalar loop they replace. `simdKernels` is null where WebAssembly SIMD is missing (or
 * NIMBLE_NO_WASM_SIMD is set, or on a big-endian host); callers then use the scalar path.
 */
import { endianness } from "node:os";
import { assemble, type Code, type Func, op, T } from "./wasmAsm.js";

/** Values per kernel call: the destination's piece, then the payload's, fit in memory. */
const PIECE = 32768;
const DST = 0;
const SRC = PIECE * 4;
const PAGES = (2 * PIECE * 4) / 65536;
/** Where an int8 piece's values start, after its scales (PIECE / 256 of them). */
const Q_OFFSET = 4096;

const { get, set, i32 } = op;

/** while (p < end) { ...body } with p, end locals (body advances p). */
const whileBelow = (p: number, end: number, ...body: Code[]): Code =>
  op.block(op.loop(get(p), get(end), op.i32GeU, op.brIf(1), ...body, op.br(0)));
const bump = (local: number, by: number): Code => [...get(local), ...i32(by), ...op.i32Add, ...set(local)];
/** end = p + n * 4 */
const endOf = (p: number, n: number, end: number): Code => [...get(p), ...get(n), ...i32(2), ...op.i32Shl, ...op.i32Add, ...set(end)];
/** *dst = *dst + value, value computed by `value` (f32x4) */
const addInto = (dst: number, value: Code, at = 0): Code => [
  ...get(dst),
  ...get(dst),
  ...op.v128LoadAt(at),
  ...value,
  ...op.f32x4Add,
  ...op.v128StoreAt(at),
];

// addF32(dst, src, n): n float32 at dst += n float32 at src; n a multiple of 4.
const addF32: Func = {
  name: "addF32",
  params: 3,
  locals: [T.i32],
  body: [endOf(0, 2, 3), whileBelow(0, 3, addInto(0, [...get(1), ...op.v128Load]), bump(0, 16), bump(1, 16))],
};

// addBf16(dst, src, n): bfloat16 is the top half of a float32.
const addBf16: Func = {
  name: "addBf16",
  params: 3,
  locals: [T.i32],
  body: [endOf(0, 2, 3), whileBelow(0, 3, addInto(0, [...get(1), ...op.load16x4U, ...i32(16), ...op.i32x4Shl]), bump(0, 16), bump(1, 8))],
};

// addF16(dst, src, n): (h & 0x7fff) << 13 read as a float32 and scaled by 2^112 is exact
// for normals, subnormals and zero; exponent 31 (Inf, NaN) keeps its mantissa under
// 0x7f800000; then the sign. The bits of codecs.ts's f16ToBits, lane by lane.
const [H, EM, O, C7FFF, CINF, CMAX, CSIGN, CSCALE] = [4, 5, 6, 7, 8, 9, 10, 11];
const splat = (n: number, local: number): Code => [...i32(n), ...op.i32x4Splat, ...set(local)];
const addF16: Func = {
  name: "addF16",
  params: 3,
  locals: [T.i32, T.v128, T.v128, T.v128, T.v128, T.v128, T.v128, T.v128, T.v128],
  body: [
    endOf(0, 2, 3),
    splat(0x7fff, C7FFF),
    splat(0x7f800000, CINF),
    splat(0x7bff, CMAX),
    splat(0x8000, CSIGN),
    splat(0x77800000, CSCALE), // 2^112
    whileBelow(
      0,
      3,
      get(1), op.load16x4U, set(H),
      get(H), get(C7FFF), op.v128And, set(EM),
      get(EM), i32(13), op.i32x4Shl, set(O),
      addInto(0, [
        ...get(O), ...get(CINF), ...op.v128Or, // Inf / NaN
        ...get(O), ...get(CSCALE), ...op.f32x4Mul, // finite
        ...get(EM), ...get(CMAX), ...op.i32x4GtU,
        ...op.bitselect,
        ...get(H), ...get(CSIGN), ...op.v128And, ...i32(16), ...op.i32x4Shl,
        ...op.v128Or,
      ]),
      bump(0, 16),
      bump(1, 8),
    ),
  ],
};

// addInt8(dst, scales, q, n): blocks of 256 values from dst; a NaN scale makes its block NaN
// (0x7fc00000, as Float32Array.fill(NaN) stores), else dst += fround(q * scale). n a
// multiple of 8.
const [END, BLOCK_END, SCALE, SV, NANV, W] = [4, 5, 6, 7, 8, 9];
const addInt8: Func = {
  name: "addInt8",
  params: 4,
  locals: [T.i32, T.i32, T.f32, T.v128, T.v128, T.v128],
  body: [
    endOf(0, 3, END),
    splat(0x7fc00000, NANV),
    whileBelow(
      0,
      END,
      // blockEnd = min(dst + 1024, end)
      get(END), get(0), i32(1024), op.i32Add, get(0), i32(1024), op.i32Add, get(END), op.i32GtU, op.select, set(BLOCK_END),
      get(1), op.f32Load, set(SCALE),
      bump(1, 4),
      get(SCALE), get(SCALE), op.f32Ne,
      op.ifElse(
        [whileBelow(0, BLOCK_END, get(0), get(NANV), op.v128StoreAt(0), bump(0, 16), bump(2, 4))],
        [
          get(SCALE), op.f32x4Splat, set(SV),
          whileBelow(
            0,
            BLOCK_END,
            get(2), op.load8x8S, set(W),
            addInto(0, [...get(W), ...op.i32x4ExtendLowI16S, ...op.f32x4ConvertI32S, ...get(SV), ...op.f32x4Mul]),
            addInto(0, [...get(W), ...op.i32x4ExtendHighI16S, ...op.f32x4ConvertI32S, ...get(SV), ...op.f32x4Mul], 16),
            bump(0, 32),
            bump(2, 8),
          ),
        ],
      ),
    ),
  ],
};

type Kernel3 = (dst: number, src: number, n: number) => void;
type Kernel4 = (dst: number, scales: number, q: number, n: number) => void;

export interface SimdKernels {
  /**
   * dst += the float32 values of `src` (little-endian bytes, any alignment) for the first
   * values, a multiple of 4; returns how many (the caller adds the rest).
   */
  addF32(dst: Float32Array, src: Uint8Array): number;
  /** dst += the f16 or bf16 values of `src` (2 bytes each), as addF32 does. */
  addHalf(codec: "f16" | "bf16", dst: Float32Array, src: Uint8Array): number;
  /** dst += an int8 payload of dst.length values (scales, then values): all of them. */
  addInt8(dst: Float32Array, payload: Uint8Array): void;
}

function build(): SimdKernels | null {
  if (process.env.NIMBLE_NO_WASM_SIMD || endianness() !== "LE" || typeof WebAssembly !== "object") return null;
  const bytes = assemble([addF32, addBf16, addF16, addInt8], PAGES);
  let exports: Record<string, unknown>;
  const mem = new WebAssembly.Memory({ initial: PAGES, maximum: PAGES });
  try {
    if (!WebAssembly.validate(bytes)) return null;
    exports = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { mem } }).exports;
  } catch {
    return null;
  }
  const u8 = new Uint8Array(mem.buffer);
  const f32 = new Float32Array(mem.buffer);
  const k = exports as { addF32: Kernel3; addBf16: Kernel3; addF16: Kernel3; addInt8: Kernel4 };

  /** Run a kernel over dst's first `vec` values in pieces; `load` copies a piece's payload in. */
  const pieces = (dst: Float32Array, vec: number, load: (lo: number, n: number) => void, kernel: (n: number) => void): number => {
    for (let lo = 0; lo < vec; lo += PIECE) {
      const n = Math.min(PIECE, vec - lo);
      const d = dst.subarray(lo, lo + n);
      f32.set(d, DST / 4);
      load(lo, n);
      kernel(n);
      d.set(f32.subarray(DST / 4, DST / 4 + n));
    }
    return vec;
  };
  const multipleOf = (n: number, m: number) => n - (n % m);

  return {
    addF32: (dst, src) => pieces(dst, multipleOf(dst.length, 4), (lo, n) => u8.set(src.subarray(lo * 4, (lo + n) * 4), SRC), (n) => k.addF32(DST, SRC, n)),
    addHalf(codec, dst, src) {
      const kernel = codec === "f16" ? k.addF16 : k.addBf16;
      return pieces(dst, multipleOf(dst.length, 4), (lo, n) => u8.set(src.subarray(lo * 2, (lo + n) * 2), SRC), (n) => kernel(DST, SRC, n));
    },
    addInt8(dst, payload) {
      const count = dst.length;
      const blocks = Math.ceil(count / 256);
      // pieces are whole blocks (PIECE is a multiple of 256): their scales, then their values
      const vec = pieces(dst, multipleOf(count, 8), (lo, n) => {
        u8.set(payload.subarray(lo / 64, lo / 64 + Math.ceil(n / 256) * 4), SRC);
        u8.set(payload.subarray(blocks * 4 + lo, blocks * 4 + lo + n), SRC + Q_OFFSET);
      }, (n) => k.addInt8(DST, SRC, SRC + Q_OFFSET, n));
      if (vec === count) return;
      // the last few values, all in the last block
      const scale = new DataView(payload.buffer, payload.byteOffset, blocks * 4).getFloat32((blocks - 1) * 4, true);
      const q = new Int8Array(payload.buffer, payload.byteOffset + blocks * 4, count);
      for (let i = vec; i < count; i++) {
        if (Number.isNaN(scale)) dst[i] = NaN;
        else dst[i] += Math.fround(q[i] * scale);
      }
    },
  };
}

/** The kernels, or null where WebAssembly SIMD is not available. */
export const simdKernels: SimdKernels | null = build();
