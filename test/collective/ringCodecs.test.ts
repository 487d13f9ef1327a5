import { afterEach, describe, expect, it } from "vitest";
import { chunkElements, roundTrip } from "../../src/collective/codecs.js";
import {
  expectedBytesPerNode,
  expectedFrameBytesPerNode,
  RingAllReduce,
  type RingStats,
  segmentBounds,
  type WireCodec,
} from "../../src/collective/ring.js";
import { ProtocolError } from "../../src/errors.js";
import {
  CHUNK_HEADER_BYTES,
  DEFAULT_CHUNK_BYTES,
  encodeCodedChunk,
  encodeControl,
  INT4_BLOCK,
  INT8_BLOCK,
  MAX_FRAME_BYTES,
  newChunkFrame,
} from "../../src/protocol/frames.js";
import { bitsEqual, closeAll, randomBuffer, randomInputs, sleep, startRing, waitClosed } from "./ringHarness.js";

afterEach(async () => {
  await closeAll();
});

const CODECS: WireCodec[] = ["f32", "f16", "bf16", "int8", "int4"];


/**
 * What the ring computes, simulated: segment s starts at rank s, each of the next N-1
 * ranks adds its own values to decode(encode(partial sum)), and the owner (rank s-1)
 * keeps decode(encode(sum)), which every rank then decodes from the same bytes. Int8 and
 * int4 chunks are whole blocks from the segment start, so encoding the segment at once
 * gives the same blocks as encoding it chunk by chunk.
 */
function simulate(inputs: Float32Array[], codec: WireCodec): Float32Array {
  const n = inputs.length;
  const length = inputs[0].length;
  if (n === 1) return inputs[0].slice();
  const out = new Float32Array(length);
  segmentBounds(length, n).forEach(({ start, end }, s) => {
    let acc = inputs[s].slice(start, end);
    for (let k = 1; k < n; k++) {
      const dec = roundTrip(codec, acc);
      acc = inputs[(s + k) % n].slice(start, end);
      for (let i = 0; i < acc.length; i++) acc[i] += dec[i];
    }
    out.set(roundTrip(codec, acc), start);
  });
  return out;
}

/**
 * Error bound of element i against the exact (float64) sum. Element i is encoded N
 * times: once per reduce-scatter hop (N-1) and once by the segment's owner. Each
 * encoding errs by at most half a step of the value it encodes, and every partial sum
 * is bounded by mag = sum over ranks of |x_r[i]| (plus the error so far: the (1 + ...)
 * factors). Half a step is 2^-11 relative for f16 (plus 2^-25 absolute in the
 * subnormals), 2^-8 relative for bf16, and for int8 scale/2 = absmax/254 of the
 * element's block (absmax/14 for int4), whose partial sums are bounded by blockMag = max
 * over the block of mag. Each of the N-1 float32 additions adds at most 2^-24 relative.
 *   f16:  N * 2^-11 * mag * (1 + N * 2^-10) + N * 2^-25 + N * 2^-24 * mag
 *   bf16: N * 2^-8  * mag * (1 + N * 2^-7) + N * 2^-24 * mag
 *   int8: N * blockMag / 254 * (1 + N / 254) + N * 2^-23 * blockMag
 *   int4: N * blockMag / 14 * (1 + N / 14) + N * 2^-23 * blockMag (N <= 5 here)
 *   f32:  1e-5 * mag (as before)
 */
function errorBound(codec: WireCodec, n: number, mag: number, blockMag: number): number {
  switch (codec) {
    case "f32":
      return 1e-5 * mag;
    case "f16":
      return n * 2 ** -11 * mag * (1 + n * 2 ** -10) + n * 2 ** -25 + n * 2 ** -24 * mag;
    case "bf16":
      return n * 2 ** -8 * mag * (1 + n * 2 ** -7) + n * 2 ** -24 * mag;
    case "int8":
      return ((n * blockMag) / 254) * (1 + n / 254) + n * 2 ** -23 * blockMag;
    case "int4":
      return ((n * blockMag) / 14) * (1 + n / 14) + n * 2 ** -23 * blockMag;
  }
}

/** One all-reduce with `codec` of fresh random buffers on every rank, fully checked. */
async function checkCodec(
  rings: RingAllReduce[],
  codec: WireCodec,
  length: number,
  seed: number,
  chunkBytes = DEFAULT_CHUNK_BYTES,
): Promise<RingStats[]> {
  const n = rings.length;
  const { inputs, exact, magnitude: mag } = randomInputs(n, length, seed);
  // blockMag: max of mag over the element's int8 / int4 block (blocks counted from the segment start)
  const blockMag = new Float64Array(length);
  const blockLen = codec === "int4" ? INT4_BLOCK : INT8_BLOCK;
  for (const { start, end } of segmentBounds(length, n)) {
    for (let lo = start; lo < end; lo += blockLen) {
      const hi = Math.min(end, lo + blockLen);
      let m = 0;
      for (let i = lo; i < hi; i++) m = Math.max(m, mag[i]);
      blockMag.fill(m, lo, hi);
    }
  }
  const buffers = inputs.map((b) => b.slice());
  const stats = await Promise.all(rings.map((ring, r) => ring.allReduce(buffers[r], { codec })));
  const want = simulate(inputs, codec);
  for (let r = 0; r < n; r++) {
    expect(bitsEqual(buffers[r], buffers[0]), `rank ${r} differs from rank 0 (${codec}, N ${n}, L ${length})`).toBe(true);
  }
  expect(bitsEqual(buffers[0], want), `ring differs from the simulation (${codec}, N ${n}, L ${length})`).toBe(true);
  const got = buffers[0];
  for (let i = 0; i < length; i++) {
    const bound = n === 1 ? 0 : errorBound(codec, n, mag[i], blockMag[i]);
    if (!(Math.abs(got[i] - exact[i]) <= bound)) {
      throw new Error(`${codec} N ${n} L ${length} element ${i}: got ${got[i]}, want ${exact[i]} within ${bound}`);
    }
  }
  for (let r = 0; r < n; r++) {
    expect(stats[r].bytesSent).toBe(expectedFrameBytesPerNode(length, n, r, codec, chunkBytes));
    expect(stats[r].payloadBytes).toBe(expectedBytesPerNode(length, n, r, codec, chunkBytes));
  }
  return stats;
}

describe("ring all-reduce with wire codecs", () => {
  const lengths = [0, 1, 255, 257, 1001, 70001];
  for (const codec of CODECS) {
    for (let n = 1; n <= 5; n++) {
      it(`${codec}, N = ${n}: replicas bitwise equal, within the codec's bound, bytes exact`, async () => {
        const rings =
          n === 1 ? [new RingAllReduce({ rank: 0, size: 1, next: null, prev: null })] : (await startRing(n)).rings;
        let op = 0;
        for (const L of lengths) {
          const stats = await checkCodec(rings, codec, L, op + 100 * n);
          for (const s of stats) expect(s.op).toBe(op);
          op++;
        }
      });
    }
  }

  it("spans many chunks with a small chunkBytes (int8 and int4 chunks are whole blocks)", async () => {
    const chunkBytes = 1024;
    const h = await startRing(3, { chunkBytes });
    const L = 100_003;
    for (const codec of CODECS) {
      const stats = await checkCodec(h.rings, codec, L, 7, chunkBytes);
      const perChunk = chunkElements(codec, chunkBytes);
      // every phase sends a segment of about L/3 elements in chunks of perChunk
      for (const s of stats) expect(s.frames).toBeGreaterThanOrEqual(4 * Math.floor(L / 3 / perChunk));
    }
    expect(chunkElements("int8", chunkBytes)).toBe(768);
    expect(chunkElements("int4", chunkBytes)).toBe(28 * 64); // 28 blocks of 4 + 32 bytes
  });

  it("f32 through the codec option is the old all-reduce, bit for bit", async () => {
    const h = await startRing(4, { chunkBytes: 4096 });
    const L = 20_011;
    const inputs = h.rings.map((_, r) => randomBuffer(L, 50 + r));
    const a = inputs.map((b) => b.slice());
    const b = inputs.map((x) => x.slice());
    const s1 = await Promise.all(h.rings.map((ring, r) => ring.allReduce(a[r])));
    const s2 = await Promise.all(h.rings.map((ring, r) => ring.allReduce(b[r], { codec: "f32" })));
    for (let r = 0; r < 4; r++) {
      expect(bitsEqual(a[r], b[r])).toBe(true);
      expect(s1[r].bytesSent).toBe(s2[r].bytesSent);
      expect(s1[r].payloadBytes).toBe(L > 0 ? expectedBytesPerNode(L, 4, r) : 0);
    }
    expect(bitsEqual(a[0], simulate(inputs, "f32"))).toBe(true);
  });

  it("compressed codecs send half (f16, bf16), about (1 + 4/256)/4 (int8) and (0.5 + 4/64)/4 (int4) of the f32 payload", async () => {
    const n = 4;
    const h = await startRing(n);
    const L = (1 << 20) + 13;
    const payload: Record<string, number> = {};
    for (const codec of CODECS) {
      const bufs = h.rings.map((_, r) => randomBuffer(L, r + 1));
      const stats = await Promise.all(h.rings.map((ring, r) => ring.allReduce(bufs[r], { codec })));
      payload[codec] = stats[0].payloadBytes;
      for (let r = 0; r < n; r++) {
        expect(stats[r].bytesSent).toBe(expectedFrameBytesPerNode(L, n, r, codec));
        // MAX_FRAME_BYTES bounds every frame: at most (bytesSent - op frame) / frames... and by construction
        expect(stats[r].bytesSent).toBeLessThan(stats[r].frames * MAX_FRAME_BYTES);
      }
    }
    expect(payload.f16).toBe(payload.f32 / 2);
    expect(payload.bf16).toBe(payload.f32 / 2);
    const ratio = payload.int8 / payload.f32;
    expect(ratio).toBeGreaterThanOrEqual((1 + 4 / 256) / 4);
    expect(ratio).toBeLessThan(((1 + 4 / 256) / 4) * 1.001);
    // the coordinator's "uncompressed" figure is the f32 frame count
    expect(expectedFrameBytesPerNode(L, n, 0, "f32") / expectedFrameBytesPerNode(L, n, 0, "int8")).toBeGreaterThan(3.9);
    const ratio4 = payload.int4 / payload.f32;
    expect(ratio4).toBeGreaterThanOrEqual((0.5 + 4 / 64) / 4);
    expect(ratio4).toBeLessThan(((0.5 + 4 / 64) / 4) * 1.001);
    expect(expectedFrameBytesPerNode(L, n, 0, "f32") / expectedFrameBytesPerNode(L, n, 0, "int4")).toBeGreaterThan(7);
  });

  it("every frame fits MAX_FRAME_BYTES for every codec at the default chunk size", () => {
    for (const codec of CODECS) {
      const count = chunkElements(codec, DEFAULT_CHUNK_BYTES);
      expect(newChunkFrame({ phase: 0, op: 0, chunk: 0, offset: 0, count }, codec).byteLength).toBeLessThanOrEqual(
        MAX_FRAME_BYTES,
      );
    }
  });

  it("bytesSent matches expectedFrameBytesPerNode for op numbers past 127 and 255", async () => {
    const h = await startRing(2);
    for (let k = 0; k < 300; k++) {
      const codec = CODECS[k % CODECS.length];
      const bufs = [new Float32Array(5).fill(1), new Float32Array(5).fill(2)];
      const stats = await Promise.all(h.rings.map((ring, r) => ring.allReduce(bufs[r], { codec })));
      expect(stats[0].op).toBe(k);
      for (let r = 0; r < 2; r++) expect(stats[r].bytesSent).toBe(expectedFrameBytesPerNode(5, 2, r, codec));
      expect(bufs[0][0]).toBe(3);
    }
  }, 30_000);

  it("ranks out of step with codecs (prev runs an op ahead)", async () => {
    const n = 3;
    const h = await startRing(n, { chunkBytes: 1024 });
    const L = 3001;
    for (let k = 0; k < CODECS.length; k++) {
      const codec = CODECS[k];
      const inputs = h.rings.map((_, r) => randomBuffer(L, 300 + 10 * k + r));
      const bufs = inputs.map((b) => b.slice());
      await Promise.all(
        h.rings.map(async (ring, r) => {
          if (r === 0) await sleep(20);
          await ring.allReduce(bufs[r], { codec });
        }),
      );
      for (let r = 0; r < n; r++) expect(bitsEqual(bufs[r], simulate(inputs, codec))).toBe(true);
    }
  });
});

describe("non-finite values", () => {
  const L = 1001;
  const n = 3;
  // segments of 1001 over 3 ranks: [0, 334), [334, 668), [668, 1001); element 600 is in
  // segment 1, whose int8 blocks are [334, 590) and [590, 668), and whose int4 blocks
  // are [334 + 64k, 398 + 64k): 600 is in [590, 654)
  const bad = 600;
  const blocks: Partial<Record<WireCodec, number[]>> = { int8: [590, 668], int4: [590, 654] };
  it("(the segments are as assumed)", () => {
    expect(segmentBounds(L, n)[1]).toEqual({ start: 334, end: 668 });
  });

  for (const codec of CODECS) {
    for (const value of [NaN, Infinity]) {
      it(`${codec}: ${value} on one rank makes the sum non-finite on every rank`, async () => {
        const h = await startRing(n);
        const bufs = h.rings.map((_, r) => randomBuffer(L, 70 + r));
        bufs[1][bad] = value;
        await Promise.all(h.rings.map((ring, r) => ring.allReduce(bufs[r], { codec })));
        for (let r = 0; r < n; r++) {
          expect(bitsEqual(bufs[r], bufs[0])).toBe(true);
          for (let i = 0; i < L; i++) {
            const block = blocks[codec];
            const inBlock = block ? i >= block[0] && i < block[1] : i === bad;
            if (!inBlock) expect(Number.isFinite(bufs[r][i])).toBe(true);
            else if (block) expect(Number.isNaN(bufs[r][i])).toBe(true);
            else expect(bufs[r][i]).toBe(value); // NaN stays NaN, Inf stays Inf
          }
        }
      });
    }
  }

  it("+Inf and -Inf on two ranks give NaN everywhere", async () => {
    for (const codec of CODECS) {
      const h = await startRing(n);
      const bufs = h.rings.map((_, r) => randomBuffer(L, 80 + r));
      bufs[0][5] = Infinity;
      bufs[2][5] = -Infinity;
      await Promise.all(h.rings.map((ring, r) => ring.allReduce(bufs[r], { codec })));
      for (const b of bufs) expect(Number.isNaN(b[5])).toBe(true);
      await h.close();
    }
  });

  it("f16 overflow of the sum becomes Inf on every rank", async () => {
    const h = await startRing(n);
    const bufs = h.rings.map(() => new Float32Array(10).fill(1));
    for (const b of bufs) b[5] = 40000;
    await Promise.all(h.rings.map((ring, r) => ring.allReduce(bufs[r], { codec: "f16" })));
    for (const b of bufs) {
      expect(b[5]).toBe(Infinity);
      expect(b[4]).toBe(3);
    }
  });
});

describe("codec failures", () => {
  const L = 1000;
  // with N = 2, rank 0 receives segment 1 (elements 500..999) from rank 1 in phase 0
  const header = { phase: 0, op: 0, chunk: 0, offset: 500, count: 500 };

  async function rogueCase(codec: WireCodec, frames: Uint8Array[]): Promise<{ err: unknown; untouched: boolean; code: number }> {
    const h = await startRing(2, { manual: [1] });
    const buf = randomBuffer(L, 1);
    const before = buf.slice();
    const result = h.rings[0].allReduce(buf, { codec });
    for (const f of frames) await h.nodes[1].next.send(f);
    const err = await result.catch((e: unknown) => e);
    const ws = h.nodes[1].next.ws;
    const code = await waitClosed(ws);
    await expect(h.rings[0].allReduce(buf, { codec })).rejects.toBe(err);
    return { err, untouched: bitsEqual(buf, before), code };
  }

  const op = (codec: WireCodec) => encodeControl({ t: "op", op: 0, kind: "allreduce", count: L, dtype: "float32", codec });

  it("a codec mismatch between ranks drops the link before anything is summed", async () => {
    const { err, untouched, code } = await rogueCase("int8", [
      op("f16"),
      encodeCodedChunk(header, "f16", new Uint8Array(1000)),
    ]);
    expect(err).toBeInstanceOf(ProtocolError);
    expect((err as Error).message).toMatch(/announced op 0 with codec f16, the local op uses int8/);
    expect(untouched).toBe(true);
    expect(code).toBe(4003);
  });

  it("an old-style op frame (no codec) means f32", async () => {
    const { err } = await rogueCase("bf16", [encodeControl({ t: "op", op: 0, count: L, dtype: "float32" })]);
    expect((err as Error).message).toMatch(/with codec f32, the local op uses bf16/);
  });

  it("two real rings with different codecs both fail", async () => {
    const h = await startRing(3);
    const bufs = h.rings.map((_, r) => randomBuffer(L, r + 1));
    const before = bufs.map((b) => b.slice());
    const results = await Promise.all(
      h.rings.map((ring, r) => ring.allReduce(bufs[r], { codec: r === 0 ? "f16" : "int8" }).catch((e: unknown) => e)),
    );
    for (const e of results) expect(e).toBeInstanceOf(Error);
    // rank 1 hears rank 0's f16 announcement; it sums nothing
    const msgs = results.map((e) => (e as Error).message).join("\n");
    expect(msgs).toMatch(/codec (f16|int8), the local op uses (int8|f16)/);
    expect(bitsEqual(bufs[1], before[1])).toBe(true);
  });

  it("a chunk in another codec than announced is rejected", async () => {
    const { err, untouched, code } = await rogueCase("int8", [
      op("int8"),
      encodeCodedChunk(header, "f16", new Uint8Array(1000)),
    ]);
    expect((err as Error).message).toMatch(/tensor chunk from prev \(rank 1\) is f16 but op 0 was announced as int8/);
    expect(untouched).toBe(true);
    expect(code).toBe(4003);
  });

  it("a payload of the wrong length for the codec is rejected before summing", async () => {
    const good = newChunkFrame(header, "f16");
    const { err, untouched, code } = await rogueCase("f16", [op("f16"), good.subarray(0, good.length - 2)]);
    expect((err as Error).message).toMatch(/payload is 998 bytes but count 500 needs 1000 as float16/);
    expect(untouched).toBe(true);
    expect(code).toBe(4003);
  });

  it("an int8 chunk with a scale missing is rejected", async () => {
    // 500 values need 2 scales: send 1 scale and 500 values
    const frame = new Uint8Array(CHUNK_HEADER_BYTES + 4 + 500);
    frame.set(newChunkFrame(header, "int8").subarray(0, CHUNK_HEADER_BYTES));
    const { err, untouched, code } = await rogueCase("int8", [op("int8"), frame]);
    expect((err as Error).message).toMatch(/payload is 504 bytes but count 500 needs 2 scales \+ 500 int8 values = 508/);
    expect(untouched).toBe(true);
    expect(code).toBe(4003);
  });

  it("an int8 chunk with a negative scale is rejected", async () => {
    const frame = newChunkFrame(header, "int8");
    new DataView(frame.buffer).setFloat32(CHUNK_HEADER_BYTES + 4, -0.5, true);
    const { err, untouched } = await rogueCase("int8", [op("int8"), frame]);
    expect((err as Error).message).toMatch(/bad scale -0.5 in block 1/);
    expect(untouched).toBe(true);
  });

  it("int8 chunks cut at other than 256-element boundaries are out of sequence", async () => {
    // the expected first chunk of segment 1 is all 500 elements (one chunk); a rogue
    // that splits it at 300 is refused
    const { err, untouched } = await rogueCase("int8", [
      op("int8"),
      encodeCodedChunk({ ...header, count: 300 }, "int8", new Uint8Array(8 + 300)),
    ]);
    expect((err as Error).message).toMatch(/expected op 0 phase 0 chunk 0 offset 500 count 500, got .* count 300/);
    expect(untouched).toBe(true);
  });

  it("an int4 chunk with a scale missing is rejected", async () => {
    // 500 values need 8 scales and 250 bytes: send 7 scales
    const frame = new Uint8Array(CHUNK_HEADER_BYTES + 7 * 4 + 250);
    frame.set(newChunkFrame(header, "int4").subarray(0, CHUNK_HEADER_BYTES));
    const { err, untouched, code } = await rogueCase("int4", [op("int4"), frame]);
    expect((err as Error).message).toMatch(/payload is 278 bytes but count 500 needs 8 scales \+ 250 bytes of int4 values = 282/);
    expect(untouched).toBe(true);
    expect(code).toBe(4003);
  });

  it("an int4 chunk with the value -8 is rejected", async () => {
    const frame = newChunkFrame(header, "int4");
    frame[CHUNK_HEADER_BYTES + 8 * 4 + 100] = 0x83; // element 201 is -8
    const { err, untouched, code } = await rogueCase("int4", [op("int4"), frame]);
    expect((err as Error).message).toMatch(/int4 chunk has value -8 at element 201/);
    expect(untouched).toBe(true);
    expect(code).toBe(4003);
  });

  it("int4 chunks cut at other than 64-element boundaries are out of sequence", async () => {
    const { err, untouched } = await rogueCase("int4", [
      op("int4"),
      encodeCodedChunk({ ...header, count: 300 }, "int4", new Uint8Array(5 * 4 + 150)),
    ]);
    expect((err as Error).message).toMatch(/expected op 0 phase 0 chunk 0 offset 500 count 500, got .* count 300/);
    expect(untouched).toBe(true);
  });

  it("rejects an unknown codec locally without touching the ring", async () => {
    const h = await startRing(2);
    await expect(h.rings[0].allReduce(new Float32Array(4), { codec: "fp8" as WireCodec })).rejects.toThrow(/unknown wire codec/);
    const bufs = [new Float32Array([1]), new Float32Array([2])];
    await Promise.all(h.rings.map((ring, r) => ring.allReduce(bufs[r], { codec: "bf16" })));
    expect(bufs[0][0]).toBe(3);
  });
});
