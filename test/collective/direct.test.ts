/**
 * The direct (butterfly) all-reduce over real TLS loopback links: every codec, N = 2..5,
 * lengths not divisible by N (and shorter than N), bitwise identical replicas equal to a
 * simulation of the rank-order sum, within the codec's error of the float64 sum; frames
 * and bytes as counted; a peer that breaks the protocol or goes away.
 */
import { encode } from "@msgpack/msgpack";
import { afterEach, describe, expect, it } from "vitest";
import { roundTrip } from "../../src/collective/codecs.js";
import { DirectAllReduce, expectedDirectBytesPerNode, expectedDirectFrameBytesPerNode, PHASE_CONTRIBUTE, PHASE_RESULT } from "../../src/collective/direct.js";
import { LinkLostError, segmentBounds, type WireCodec } from "../../src/collective/ring.js";
import { ProtocolError } from "../../src/errors.js";
import { encodeBlobChunk, encodeChunk, encodeCodedChunk, encodeControl, FRAME_CONTROL, INT4_BLOCK, INT8_BLOCK } from "../../src/protocol/frames.js";
import { closeAllDirect, startDirect } from "./directHarness.js";
import { bitsEqual, randomBuffer, randomInputs, sleep, waitClosed } from "./ringHarness.js";

afterEach(async () => {
  await closeAllDirect();
});

const CODECS: WireCodec[] = ["f32", "f16", "bf16", "int8", "int4"];

/**
 * What the direct all-reduce computes: segment s's owner adds the contributions in
 * position order, each decode(encode(x)) but its own (used as it is), in float32, and
 * keeps decode(encode(sum)). Int8/int4 chunks are whole blocks from the segment start,
 * so encoding the segment at once gives the chunks' blocks.
 */
function simulate(inputs: Float32Array[], codec: WireCodec): Float32Array {
  const n = inputs.length;
  const out = inputs[0].slice();
  if (n === 1) return out;
  segmentBounds(inputs[0].length, n).forEach(({ start, end }, s) => {
    let acc: Float32Array | null = null;
    for (let p = 0; p < n; p++) {
      const own = inputs[p].slice(start, end);
      const x = p === s ? own : roundTrip(codec, own);
      if (!acc) acc = x.slice();
      else for (let i = 0; i < acc.length; i++) acc[i] += x[i];
    }
    out.set(roundTrip(codec, acc!), start);
  });
  return out;
}

/** Each element is encoded at most twice (its contribution, the sum): the ring's per-hop bound with 2 encodings. */
function errorBound(codec: WireCodec, n: number, mag: number, blockMag: number): number {
  const k = 2;
  switch (codec) {
    case "f32":
      return 1e-5 * mag;
    case "f16":
      return k * 2 ** -11 * mag * (1 + k * 2 ** -10) + k * 2 ** -25 + n * 2 ** -24 * mag;
    case "bf16":
      return k * 2 ** -8 * mag * (1 + k * 2 ** -7) + n * 2 ** -24 * mag;
    case "int8":
      return ((k * blockMag) / 254) * (1 + k / 254) + n * 2 ** -23 * blockMag;
    case "int4":
      return ((k * blockMag) / 14) * (1 + k / 14) + n * 2 ** -23 * blockMag;
  }
}

async function check(reducers: DirectAllReduce[], codec: WireCodec, length: number, seed: number, chunkBytes?: number) {
  const n = reducers.length;
  const { inputs, exact, magnitude: mag } = randomInputs(n, length, seed);
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
  const stats = await Promise.all(reducers.map((d, r) => d.allReduce(buffers[r], { codec })));
  for (let r = 1; r < n; r++) expect(bitsEqual(buffers[r], buffers[0]), `rank ${r} differs from rank 0 (${codec}, N ${n}, L ${length})`).toBe(true);
  expect(bitsEqual(buffers[0], simulate(inputs, codec)), `differs from the simulation (${codec}, N ${n}, L ${length})`).toBe(true);
  for (let i = 0; i < length; i++) {
    const bound = n === 1 ? 0 : errorBound(codec, n, mag[i], blockMag[i]);
    if (!(Math.abs(buffers[0][i] - exact[i]) <= bound)) throw new Error(`${codec} N ${n} L ${length} element ${i}: got ${buffers[0][i]}, want ${exact[i]} within ${bound}`);
  }
  for (let r = 0; r < n; r++) {
    expect(stats[r].bytesSent).toBe(expectedDirectFrameBytesPerNode(length, n, r, codec, chunkBytes));
    expect(stats[r].payloadBytes).toBe(expectedDirectBytesPerNode(length, n, r, codec, chunkBytes));
  }
  return stats;
}

describe("direct all-reduce", () => {
  for (let n = 2; n <= 5; n++) {
    it(`N = ${n}: every codec, lengths 0, < N, not divisible by N: replicas bitwise equal, the rank-order sum, bytes exact`, async () => {
      const h = await startDirect(n);
      let op = 0;
      for (const codec of CODECS) {
        for (const L of [0, 1, n - 1, n + 1, 255, 1001, 70_001]) {
          const stats = await check(h.reducers, codec, L, 1000 * n + op);
          for (const s of stats) expect(s.op).toBe(op);
          op++;
        }
      }
      for (const d of h.reducers) expect(d.opsCompleted).toBe(op);
    });
  }

  it("alone (N = 1) sends nothing and keeps the buffer", async () => {
    const d = new DirectAllReduce({ position: 0, size: 1, peers: [] });
    const buf = randomBuffer(17, 3);
    const before = buf.slice();
    const s = await d.allReduce(buf);
    expect(s.bytesSent).toBe(0);
    expect(bitsEqual(buf, before)).toBe(true);
  });

  it("many chunks per segment with a small chunkBytes, and a small high-water mark (backpressure)", async () => {
    const chunkBytes = 1024;
    const h = await startDirect(4, { chunkBytes, highWaterMark: 4096 });
    for (const codec of CODECS) {
      const stats = await check(h.reducers, codec, 100_003, 11, chunkBytes);
      for (const s of stats) expect(s.frames).toBeGreaterThan(50);
    }
  });

  it("sends 2(N-1)/N of the buffer per member, as the ring does", () => {
    const L = 1_000_000;
    for (let n = 2; n <= 8; n++) {
      for (let r = 0; r < n; r++) expect(expectedDirectBytesPerNode(L, n, r)).toBeCloseTo((2 * (n - 1) * L * 4) / n, -2);
    }
  });

  it("a member that starts late gets the ops of members that started early (held, then used)", async () => {
    const h = await startDirect(3);
    const { inputs } = randomInputs(3, 5001, 9);
    const bufs = inputs.map((b) => b.slice());
    const early = [h.reducers[0].allReduce(bufs[0]), h.reducers[1].allReduce(bufs[1])];
    await sleep(100);
    const late = h.reducers[2].allReduce(bufs[2]);
    await Promise.all([...early, late]);
    expect(bitsEqual(bufs[0], bufs[2])).toBe(true);
    expect(bitsEqual(bufs[0], simulate(inputs, "f32"))).toBe(true);
    // and back to back, several ops in a row
    for (let k = 0; k < 5; k++) {
      const { inputs: x } = randomInputs(3, 777, 20 + k);
      const b = x.map((v) => v.slice());
      await Promise.all(h.reducers.map((d, r) => d.allReduce(b[r], { codec: "bf16" })));
      expect(bitsEqual(b[1], simulate(x, "bf16"))).toBe(true);
    }
  });

  it("ops are sequential", async () => {
    const h = await startDirect(2);
    const a = h.reducers[0].allReduce(new Float32Array(10));
    await expect(h.reducers[0].allReduce(new Float32Array(10))).rejects.toThrow(/sequential/);
    await Promise.all([a, h.reducers[1].allReduce(new Float32Array(10))]);
  });

  it("a peer that goes away: LinkLostError naming it, every link closed", async () => {
    const h = await startDirect(3);
    const bufs = [0, 1, 2].map((r) => randomBuffer(100_000, r));
    const ops = [h.reducers[0].allReduce(bufs[0]), h.reducers[1].allReduce(bufs[1])].map((p) => p.then(() => null, (e: unknown) => e));
    // rank 2 never joins the op: its links drop
    h.nodes[2].links[0]!.send.terminate();
    h.nodes[2].links[0]!.recv.terminate();
    h.nodes[2].links[1]!.send.terminate();
    h.nodes[2].links[1]!.recv.terminate();
    const [e0, e1] = await Promise.all(ops);
    for (const e of [e0, e1]) {
      expect(e).toBeInstanceOf(LinkLostError);
      expect((e as LinkLostError).peerRank).toBe(2);
      expect((e as Error).message).toMatch(/peer rank 2/);
    }
    await expect(h.reducers[0].allReduce(bufs[0])).rejects.toBe(e0);
    await waitClosed(h.nodes[0].links[1]!.send.ws);
  });

  it("abort rejects the op in flight and closes the links", async () => {
    const h = await startDirect(3);
    const op = h.reducers[0].allReduce(new Float32Array(1000)).then(() => null, (e: unknown) => e);
    h.reducers[0].abort("step 3 abandoned");
    expect(String(await op)).toMatch(/aborted: step 3 abandoned/);
    // the others see the links go
    const [e1] = await Promise.all([h.reducers[1].allReduce(new Float32Array(1000)).then(() => null, (e: unknown) => e)]);
    expect(e1).toBeInstanceOf(LinkLostError);
  });
});

describe("direct all-reduce: malformed frames from a peer", () => {
  const L = 1000;
  // N = 2: member 0 owns [0, 500), member 1 [500, 1000). From member 1, member 0 expects the
  // contributions to [0, 500) (phase 0), then member 1's results of [500, 1000) (phase 1).
  const announce = encodeControl({ t: "op", op: 0, kind: "allreduce", count: L, dtype: "float32", codec: "f32" });
  const ones = (k: number) => new Float32Array(k).fill(1);
  const contrib = { phase: PHASE_CONTRIBUTE, op: 0, chunk: 0, offset: 0, count: 500 };
  const good = encodeChunk(contrib, ones(500));
  const control = (value: unknown) => Uint8Array.from([FRAME_CONTROL, ...encode(value)]);
  const CASES: [string, Uint8Array[]][] = [
    ["an empty frame", [announce, new Uint8Array(0)]],
    ["an unknown frame kind", [announce, Uint8Array.from([0x07, 1, 2])]],
    ["a control frame that is not msgpack", [announce, Uint8Array.from([FRAME_CONTROL, 0xc1])]],
    ["a control frame of an unknown type", [control({ t: "nope" })]],
    ["an all-gather announcement", [encodeControl({ t: "op", op: 0, kind: "allgather", size: 4 })]],
    ["an op announcement of another count", [encodeControl({ t: "op", op: 0, count: L + 1, dtype: "float32" })]],
    ["an op announcement of another codec", [encodeControl({ t: "op", op: 0, count: L, dtype: "float32", codec: "bf16" })]],
    ["an op announcement of a later op", [encodeControl({ t: "op", op: 1, count: L, dtype: "float32" })]],
    ["a chunk before its op is announced", [good]],
    ["a chunk of the peer's own segment in phase 0", [announce, encodeChunk({ ...contrib, offset: 500 }, ones(500))]],
    ["a result before the contributions", [announce, encodeChunk({ ...contrib, phase: PHASE_RESULT, offset: 500 }, ones(500))]],
    ["a chunk of a phase there is not", [announce, encodeChunk({ ...contrib, phase: 2 }, ones(500))]],
    ["a chunk one element short", [announce, encodeChunk({ ...contrib, count: 499 }, ones(499))]],
    ["a chunk of another chunk index", [announce, encodeChunk({ ...contrib, chunk: 1 }, ones(500))]],
    ["a chunk in another codec than announced", [announce, encodeCodedChunk(contrib, "f16", new Uint8Array(1000))]],
    ["a truncated chunk", [announce, good.subarray(0, good.length - 4)]],
    ["a blob chunk", [announce, encodeBlobChunk({ phase: 0, op: 0, owner: 1, total: 4, offset: 0, length: 4 }, new Uint8Array(4))]],
    ["a second announcement before the op's frames", [announce, announce]],
  ];

  for (const [what, frames] of CASES) {
    it(`${what}: ProtocolError, the links close, the buffer is untouched`, async () => {
      const h = await startDirect(2, { manual: [1] });
      const buf = randomBuffer(L, 5);
      const before = buf.slice();
      const result = h.reducers[0].allReduce(buf).then(() => null, (e: unknown) => e);
      const rogue = h.nodes[1].links[0]!.send;
      for (const f of frames) await rogue.send(f).catch(() => {});
      const err = await result;
      expect(err).toBeInstanceOf(ProtocolError);
      expect(bitsEqual(buf, before)).toBe(true);
      await waitClosed(rogue.ws);
    });
  }

  it("a frame on the link we send on (links are one-way)", async () => {
    const h = await startDirect(2, { manual: [1] });
    const result = h.reducers[0].allReduce(new Float32Array(L)).then(() => null, (e: unknown) => e);
    // member 1's receiving end of member 0's link: it is the server side; send back on it
    await h.nodes[1].links[0]!.recv.send(announce).catch(() => {});
    expect(await result).toBeInstanceOf(ProtocolError);
  });
});
