import { afterEach, describe, expect, it } from "vitest";
import {
  expectedAllGatherBytesPerNode,
  expectedFrameBytesPerNode,
  RingAllReduce,
  type WireCodec,
} from "../../src/collective/ring.js";
import { ProtocolError } from "../../src/errors.js";
import { DEFAULT_CHUNK_BYTES, encodeBlobChunk, encodeChunk, encodeControl } from "../../src/protocol/frames.js";
import { closeAll, type Harness, randomBuffer, sleep, startRing, waitClosed } from "./ringHarness.js";

afterEach(async () => {
  await closeAll();
});

function randomBlob(length: number, seed: number): Uint8Array {
  const f = randomBuffer(Math.ceil(length / 4), seed);
  return new Uint8Array(f.buffer).slice(0, length);
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.byteLength === b.byteLength && Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(b);
}

async function checkAllGather(rings: RingAllReduce[], sizes: number[], seed: number, chunkBytes = DEFAULT_CHUNK_BYTES) {
  const n = rings.length;
  const blobs = sizes.map((len, r) => randomBlob(len, seed * 17 + r + 1));
  const results = await Promise.all(rings.map((ring, r) => ring.allGather(blobs[r])));
  for (let r = 0; r < n; r++) {
    const { blobs: got, stats } = results[r];
    expect(got.length).toBe(n);
    for (let k = 0; k < n; k++) expect(sameBytes(got[k], blobs[k]), `rank ${r} blob ${k}`).toBe(true);
    expect(stats.bytesSent).toBe(expectedAllGatherBytesPerNode(sizes, r, chunkBytes));
    let payload = 0;
    for (let p = 0; p < n - 1; p++) payload += sizes[(r - p + n) % n];
    expect(stats.payloadBytes).toBe(payload);
  }
  return results;
}

describe("ring all-gather of byte blobs", () => {
  const chunkBytes = 1024;
  const pool = [0, 1, 3000, 1024, 2049, 7, 0, 10_000];
  for (let n = 1; n <= 5; n++) {
    it(`N = ${n}: different sizes (0 and multi-chunk included), rank order, exact bytes`, async () => {
      const rings =
        n === 1
          ? [new RingAllReduce({ rank: 0, size: 1, next: null, prev: null, chunkBytes })]
          : (await startRing(n, { chunkBytes })).rings;
      for (let k = 0; k < 4; k++) {
        const sizes = Array.from({ length: n }, (_, r) => pool[(r + 3 * k) % pool.length]);
        const results = await checkAllGather(rings, sizes, k, chunkBytes);
        for (const { stats } of results) expect(stats.op).toBe(k);
      }
      // all empty
      await checkAllGather(rings, new Array(n).fill(0), 9, chunkBytes);
    });
  }

  it("default chunk size: blobs of several chunks", async () => {
    const h = await startRing(3);
    await checkAllGather(h.rings, [600_000, 0, 70_001], 1);
    expect(expectedAllGatherBytesPerNode([600_000, 0, 70_001], 0)).toBeGreaterThan(600_000 + 70_001);
  });

  it("returns copies: the caller may reuse its blob", async () => {
    const h = await startRing(2);
    const mine = new Uint8Array([1, 2, 3]);
    const [a, b] = await Promise.all([h.rings[0].allGather(mine), h.rings[1].allGather(new Uint8Array([9]))]);
    mine[0] = 42;
    expect(Array.from(a.blobs[0])).toEqual([1, 2, 3]);
    expect(Array.from(b.blobs[0])).toEqual([1, 2, 3]);
    expect(Array.from(a.blobs[1])).toEqual([9]);
  });

  it("interleaves with allReduce on the same ring (one op counter), ranks out of step", async () => {
    const n = 3;
    const h = await startRing(n, { chunkBytes: 1024 });
    const codecs: WireCodec[] = ["f32", "int8", "f16", "bf16", "int4"];
    const ops = 10;
    const L = 2001;
    const reduceIn = Array.from({ length: ops }, (_, k) => h.rings.map((_, r) => randomBuffer(L, 500 + 10 * k + r)));
    const reduceBufs = reduceIn.map((per) => per.map((b) => b.slice()));
    const gatherIn = Array.from({ length: ops }, (_, k) => h.rings.map((_, r) => randomBlob((k * 977 + r * 1500) % 5000, k * 3 + r)));
    const gathered: Uint8Array[][][] = Array.from({ length: ops }, () => []);
    await Promise.all(
      h.rings.map(async (ring, r) => {
        for (let k = 0; k < ops; k++) {
          if (r === 0) await sleep(15);
          else if (k % 2 === r % 2) await sleep(3);
          if (k % 2 === 0) {
            const s = await ring.allReduce(reduceBufs[k][r], { codec: codecs[(k / 2) % codecs.length] });
            expect(s.op).toBe(k);
            expect(s.bytesSent).toBe(expectedFrameBytesPerNode(L, n, r, codecs[(k / 2) % codecs.length], 1024));
          } else {
            const { blobs, stats } = await ring.allGather(gatherIn[k][r]);
            expect(stats.op).toBe(k);
            gathered[k][r] = blobs;
          }
        }
      }),
    );
    for (let k = 0; k < ops; k++) {
      if (k % 2 === 0) {
        for (let r = 1; r < n; r++) expect(Buffer.from(reduceBufs[k][r].buffer).equals(Buffer.from(reduceBufs[k][0].buffer))).toBe(true);
        const want = reduceIn[k][0][17] + reduceIn[k][1][17] + reduceIn[k][2][17];
        // int4 errs by up to absmax/14 of the partial sums per hop
        expect(Math.abs(reduceBufs[k][0][17] - want)).toBeLessThan(codecs[(k / 2) % codecs.length] === "int4" ? 1 : 0.05);
      } else {
        for (let r = 0; r < n; r++) {
          for (let o = 0; o < n; o++) expect(sameBytes(gathered[k][r][o], gatherIn[k][o])).toBe(true);
        }
      }
    }
    for (const ring of h.rings) expect(ring.opsCompleted).toBe(ops);
  });

  it("rejects a blob larger than maxBlobBytes locally", async () => {
    const h = await startRing(2, { maxBlobBytes: 64 });
    await expect(h.rings[0].allGather(new Uint8Array(65))).rejects.toThrow(/exceeds maxBlobBytes 64/);
    const [a] = await Promise.all(h.rings.map((ring) => ring.allGather(new Uint8Array(64))));
    expect(a.blobs.map((b) => b.length)).toEqual([64, 64]);
  });

  it("rejects a second op while one is in flight", async () => {
    const h = await startRing(2);
    const a = h.rings[0].allGather(new Uint8Array(10));
    await expect(h.rings[0].allReduce(new Float32Array(10))).rejects.toThrow(/already in progress/);
    await expect(h.rings[0].allGather(new Uint8Array(1))).rejects.toThrow(/already in progress/);
    await Promise.all([a, h.rings[1].allGather(new Uint8Array(3))]);
  });
});

describe("all-gather failures", () => {
  // N = 2: rank 0 receives rank 1's own blob (owner 1) in phase 0, its only phase
  async function rogue(frames: Uint8Array[], opts: { chunkBytes?: number; maxBlobBytes?: number } = {}) {
    const h: Harness = await startRing(2, { manual: [1], ...opts });
    const result = h.rings[0].allGather(new Uint8Array([1, 2, 3]));
    for (const f of frames) await h.nodes[1].next.send(f);
    const err = await result.catch((e: unknown) => e);
    const ws = h.nodes[1].next.ws;
    const code = await waitClosed(ws);
    expect(err).toBeInstanceOf(ProtocolError);
    expect(code).toBe(4003);
    return (err as Error).message;
  }
  const op = (size: number) => encodeControl({ t: "op", op: 0, kind: "allgather", size });
  const chunk = (h: { owner?: number; total: number; offset: number; length: number; phase?: number }) =>
    encodeBlobChunk({ phase: 0, op: 0, owner: 1, ...h }, new Uint8Array(h.length));

  it("a chunk of the wrong owner drops the link", async () => {
    expect(await rogue([op(10), chunk({ owner: 0, total: 10, offset: 0, length: 10 })])).toMatch(
      /expected op 0 phase 0 owner 1, got op 0 phase 0 owner 0/,
    );
  });

  it("a non-contiguous offset drops the link", async () => {
    const msg = await rogue(
      [op(3000), chunk({ total: 3000, offset: 0, length: 1024 }), chunk({ total: 3000, offset: 2048, length: 952 })],
      { chunkBytes: 1024 },
    );
    expect(msg).toMatch(/non-contiguous blob chunk: expected offset 1024/);
  });

  it("a first chunk that does not start at 0 drops the link", async () => {
    expect(await rogue([op(10), chunk({ total: 10, offset: 5, length: 5 })])).toMatch(/expected offset 0/);
  });

  it("a chunk of the wrong size drops the link", async () => {
    const msg = await rogue([op(3000), chunk({ total: 3000, offset: 0, length: 1000 })], { chunkBytes: 1024 });
    expect(msg).toMatch(/carries 1000 bytes, expected 1024/);
  });

  it("a total that changes between chunks drops the link", async () => {
    const msg = await rogue(
      [op(3000), chunk({ total: 3000, offset: 0, length: 1024 }), chunk({ total: 2500, offset: 1024, length: 1024 })],
      { chunkBytes: 1024 },
    );
    expect(msg).toMatch(/changed its length from 3000 to 2500/);
  });

  it("a total other than the announced size drops the link", async () => {
    expect(await rogue([op(10), chunk({ total: 11, offset: 0, length: 11 })])).toMatch(/is 11 bytes but its op frame announced 10/);
  });

  it("an oversize total drops the link", async () => {
    expect(await rogue([op(10), chunk({ total: 100, offset: 0, length: 50 })], { maxBlobBytes: 64 })).toMatch(
      /blob of rank 1 is 100 bytes, more than maxBlobBytes 64/,
    );
    expect(await rogue([op(100)], { maxBlobBytes: 64 })).toMatch(/blob of 100 bytes, more than maxBlobBytes 64/);
  });

  it("a kind mismatch drops the link", async () => {
    expect(await rogue([encodeControl({ t: "op", op: 0, kind: "allreduce", count: 4, dtype: "float32", codec: "f32" })])).toMatch(
      /announced op 0 as allreduce, the local op is allgather/,
    );
    // and the other way round: all-gather announced while the local op is an all-reduce
    const h = await startRing(2, { manual: [1] });
    const buf = new Float32Array([1, 2, 3, 4]);
    const result = h.rings[0].allReduce(buf);
    await h.nodes[1].next.send(op(3));
    await expect(result).rejects.toThrow(/announced op 0 as allgather, the local op is allreduce/);
    expect(Array.from(buf)).toEqual([1, 2, 3, 4]);
  });

  it("a tensor chunk during an all-gather (and a blob chunk during an all-reduce) drops the link", async () => {
    expect(await rogue([op(3), encodeChunk({ phase: 0, op: 0, chunk: 0, offset: 0, count: 1 }, new Float32Array(1))])).toMatch(
      /tensor chunk from prev \(rank 1\) during all-gather op 0/,
    );
    const h = await startRing(2, { manual: [1] });
    const buf = new Float32Array([1, 2, 3, 4]);
    const result = h.rings[0].allReduce(buf);
    await h.nodes[1].next.send(encodeControl({ t: "op", op: 0, kind: "allreduce", count: 4, dtype: "float32", codec: "f32" }));
    await h.nodes[1].next.send(chunk({ total: 1, offset: 0, length: 1 }));
    await expect(result).rejects.toThrow(/blob chunk from prev \(rank 1\) during all-reduce op 0/);
    expect(Array.from(buf)).toEqual([1, 2, 3, 4]);
  });

  it("a blob chunk without an announcement drops the link", async () => {
    expect(await rogue([chunk({ total: 3, offset: 0, length: 3 })])).toMatch(/blob chunk .* without an op announcement/);
  });
});
