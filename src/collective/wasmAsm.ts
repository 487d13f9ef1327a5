/**
 * Just enough of a WebAssembly binary encoder to write the ring's summation kernels
 * (simd.ts) by hand: one memory imported as "env.mem", functions of i32 parameters, and
 * the opcodes they use. Instructions are byte arrays; `fn` numbers the locals.
 * Opcode values are the WebAssembly 2.0 core and fixed-width SIMD ones.
 */

export type Code = number[];

/** unsigned LEB128 */
export function uleb(n: number): Code {
  const out: Code = [];
  do {
    let b = n & 0x7f;
    n >>>= 7;
    if (n !== 0) b |= 0x80;
    out.push(b);
  } while (n !== 0);
  return out;
}

/** signed LEB128 of a 32-bit integer */
export function sleb(n: number): Code {
  const out: Code = [];
  n |= 0;
  for (;;) {
    const b = n & 0x7f;
    n >>= 7;
    if ((n === 0 && (b & 0x40) === 0) || (n === -1 && (b & 0x40) !== 0)) {
      out.push(b);
      return out;
    }
    out.push(b | 0x80);
  }
}

const I32 = 0x7f;
const F32 = 0x7d;
const V128 = 0x7b;
export const T = { i32: I32, f32: F32, v128: V128 } as const;

const simd = (op: number, ...imm: Code): Code => [0xfd, ...uleb(op), ...imm];
/** memarg: alignment exponent 0 (unaligned is allowed everywhere), offset 0 */
const mem0: Code = [0x00, 0x00];

export const op = {
  block: (...body: Code[]): Code => [0x02, 0x40, ...body.flat(), 0x0b],
  loop: (...body: Code[]): Code => [0x03, 0x40, ...body.flat(), 0x0b],
  if: (...body: Code[]): Code => [0x04, 0x40, ...body.flat(), 0x0b],
  ifElse: (then: Code[], otherwise: Code[]): Code => [0x04, 0x40, ...then.flat(), 0x05, ...otherwise.flat(), 0x0b],
  br: (depth: number): Code => [0x0c, ...uleb(depth)],
  brIf: (depth: number): Code => [0x0d, ...uleb(depth)],
  get: (local: number): Code => [0x20, ...uleb(local)],
  set: (local: number): Code => [0x21, ...uleb(local)],
  i32: (n: number): Code => [0x41, ...sleb(n)],
  i32Add: [0x6a],
  i32Sub: [0x6b],
  i32Shl: [0x74],
  i32GeU: [0x4f],
  i32GtU: [0x4b],
  select: [0x1b],
  i32LtU: [0x49],
  i32Load: [0x28, 0x02, 0x00],
  f32Load: [0x2a, 0x02, 0x00],
  f32Ne: [0x5c],
  v128Load: simd(0x00, ...mem0),
  v128LoadAt: (offset: number): Code => simd(0x00, 0x00, ...uleb(offset)),
  v128StoreAt: (offset: number): Code => simd(0x0b, 0x00, ...uleb(offset)),
  /** 8 int8 values, sign-extended to i16x8 */
  load8x8S: simd(0x01, ...mem0),
  /** 4 uint16 values, zero-extended to i32x4 */
  load16x4U: simd(0x04, ...mem0),
  v128Store: simd(0x0b, ...mem0),
  i32x4Splat: simd(0x11),
  f32x4Splat: simd(0x13),
  i32x4GtU: simd(0x3c),
  v128And: simd(0x4e),
  v128Or: simd(0x50),
  bitselect: simd(0x52),
  i32x4ExtendLowI16S: simd(0xa7),
  i32x4ExtendHighI16S: simd(0xa8),
  i32x4Shl: simd(0xab),
  f32x4Add: simd(0xe4),
  f32x4Mul: simd(0xe6),
  f32x4ConvertI32S: simd(0xfa),
};

export interface Func {
  name: string;
  params: number;
  /** extra locals, by type, numbered after the parameters in this order */
  locals: number[];
  body: Code[];
}

function section(id: number, payload: Code): Code {
  return [id, ...uleb(payload.length), ...payload];
}

function vec(items: Code[]): Code {
  return [...uleb(items.length), ...items.flat()];
}

function name(s: string): Code {
  const bytes = [...new TextEncoder().encode(s)];
  return [...uleb(bytes.length), ...bytes];
}

/** A module importing `env.mem` (at least `pages` pages) and exporting `funcs`, all (i32...) -> (). */
export function assemble(funcs: Func[], pages: number): Uint8Array<ArrayBuffer> {
  const types = funcs.map((f) => [0x60, ...vec(Array.from({ length: f.params }, () => [I32])), 0x00]);
  const imports = vec([[...name("env"), ...name("mem"), 0x02, 0x00, ...uleb(pages)]]);
  const codes = funcs.map((f) => {
    const locals = vec(f.locals.map((t) => [0x01, t]));
    const body = [...locals, ...f.body.flat(), 0x0b];
    return [...uleb(body.length), ...body];
  });
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, vec(types)),
    ...section(2, imports),
    ...section(3, vec(funcs.map((_, i) => uleb(i)))),
    ...section(7, vec(funcs.map((f, i) => [...name(f.name), 0x00, ...uleb(i)]))),
    ...section(10, vec(codes)),
  ]);
}
