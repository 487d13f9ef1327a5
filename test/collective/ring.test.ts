import { afterEach, describe, expect, it } from "vitest";
import {
  expectedBytesPerNode,
  LinkLostError,
  RingAllReduce,
  segmentBounds,
  type RingStats,
} from "../../src/collective/ring.js";
import { ProtocolError } from "../../src/errors.js";
import { encodeChunk, encodeControl } from "../../src/protocol/frames.js";
import { bitsEqual, closeAll, randomBuffer, randomInputs, sleep, startRing, waitClosed } from "./ringHarness.js";

afterEach(async () => {
  await closeAll();
});

/** Run one all-reduce of fresh random buffers on every rank and check the result. */
async function checkAllReduce(rings: RingAllReduce[], length: number, seed: number): Promise<RingStats[]> {
  const n = rings.length;
  const { inputs, exact, magnitude } = randomInputs(n, length, seed);
  const buffers = inputs.map((b) => b.slice());
  const stats = await Promise.all(rings.map((ring, r) => ring.allReduce(buffers[r])));
  for (let r = 0; r < n; r++) {
    const got = buffers[r];
    for (let i = 0; i < length; i++) {
      const err = Math.abs(got[i] - exact[i]);
      if (err > 1e-5 * Math.max(Math.abs(exact[i]), magnitude[i])) {
        throw new Error(`rank ${r} element ${i}: got ${got[i]}, want ${exact[i]}`);
      }
    }
    expect(bitsEqual(got, buffers[0])).toBe(true);
  }
  // byte accounting
  let total = 0;
  for (let r = 0; r < n; r++) {
    expect(stats[r].payloadBytes).toBe(expectedBytesPerNode(length, n, r));
    const ideal = ((2 * (n - 1)) / n) * length * 4;
    expect(Math.abs(stats[r].payloadBytes - ideal)).toBeLessThanOrEqual(2 * (n - 1) * 4);
    expect(stats[r].bytesSent).toBeGreaterThan(stats[r].payloadBytes);
    total += stats[r].payloadBytes;
  }
  expect(total).toBe(2 * (n - 1) * length * 4);
  return stats;
}

describe("pure helpers", () => {
  it("segmentBounds covers the buffer with sizes differing by at most one", () => {
    for (const [L, N] of [
      [0, 3],
      [1, 4],
      [7, 3],
      [1001, 5],
      [12, 4],
    ]) {
      const segs = segmentBounds(L, N);
      expect(segs).toHaveLength(N);
      expect(segs[0].start).toBe(0);
      expect(segs[N - 1].end).toBe(L);
      const sizes = segs.map((s) => s.end - s.start);
      expect(Math.max(...sizes) - Math.min(...sizes)).toBeLessThanOrEqual(1);
      for (let i = 1; i < N; i++) expect(segs[i].start).toBe(segs[i - 1].end);
    }
  });

  it("expectedBytesPerNode sums to 2(N-1) L x 4", () => {
    for (const [L, N] of [
      [7, 3],
      [1001, 5],
      [2, 4],
      [10, 1],
    ]) {
      let total = 0;
      for (let r = 0; r < N; r++) total += expectedBytesPerNode(L, N, r);
      expect(total).toBe(2 * (N - 1) * L * 4);
    }
  });
});

describe("ring all-reduce over real WebSockets", () => {
  const sizes = [0, 1, 2, 7, 1001, 65537, 300000];

  for (const n of [1, 2, 3, 4, 5]) {
    it(`sums correctly on ${n} rank(s), consecutive ops on one ring`, async () => {
      if (n === 1) {
        const ring = new RingAllReduce({ rank: 0, size: 1, next: null, prev: null });
        const buf = randomBuffer(1001, 5);
        const copy = buf.slice();
        const s = await ring.allReduce(buf);
        expect(bitsEqual(buf, copy)).toBe(true);
        expect(s).toMatchObject({ op: 0, bytesSent: 0, payloadBytes: 0, frames: 0 });
        return;
      }
      const h = await startRing(n);
      let op = 0;
      for (const L of sizes) {
        const stats = await checkAllReduce(h.rings, L, op + 100 * n);
        for (const s of stats) expect(s.op).toBe(op);
        op++;
      }
    });
  }

  it("spans many chunks with a small chunkBytes (uneven segments)", async () => {
    const h = await startRing(3, { chunkBytes: 4096 });
    const stats = await checkAllReduce(h.rings, 300001, 9);
    // 100001 elements per segment at most, 1024 per chunk -> 98 chunks per phase
    for (const s of stats) expect(s.frames).toBeGreaterThan(4 * 97);
    await checkAllReduce(h.rings, 5, 10);
  });

  it("buffers frames of an op that prev starts before us (ranks out of step)", async () => {
    const n = 4;
    const h = await startRing(n, { chunkBytes: 1024 });
    const ops = 6;
    const L = 5003;
    const inputs = Array.from({ length: ops }, (_, k) => h.rings.map((_, r) => randomBuffer(L, 1000 + k * 10 + r)));
    const buffers = inputs.map((per) => per.map((b) => b.slice()));
    await Promise.all(
      h.rings.map(async (ring, r) => {
        for (let k = 0; k < ops; k++) {
          // rank 0 lags behind, so its prev runs one op ahead
          if (r === 0) await sleep(30);
          else if (k % 2 === r % 2) await sleep(5);
          const s = await ring.allReduce(buffers[k][r]);
          expect(s.op).toBe(k);
        }
      }),
    );
    for (let k = 0; k < ops; k++) {
      for (let r = 0; r < n; r++) expect(bitsEqual(buffers[k][r], buffers[k][0])).toBe(true);
      for (let i = 0; i < L; i += 97) {
        const want = inputs[k].reduce((acc, b) => acc + b[i], 0);
        expect(buffers[k][0][i]).toBeCloseTo(want, 4);
      }
    }
    for (const ring of h.rings) expect(ring.opsCompleted).toBe(ops);
  });

  it("rejects a second concurrent allReduce on the same ring", async () => {
    const h = await startRing(2);
    const a = h.rings[0].allReduce(new Float32Array(10));
    await expect(h.rings[0].allReduce(new Float32Array(10))).rejects.toThrow(/already in progress/);
    await Promise.all([a, h.rings[1].allReduce(new Float32Array(10))]);
  });
});

describe("ring failures", () => {
  it("a chunk of the wrong size drops the links, rejects the op and sums nothing", async () => {
    const h = await startRing(2, { manual: [1] });
    const ring = h.rings[0];
    const rogue = h.nodes[1];
    const L = 1000;
    const buf = randomBuffer(L, 1);
    const before = buf.slice();
    const result = ring.allReduce(buf);
    // rank 0 receives segment 1 (elements 500..999) in phase 0; send one element too few
    await rogue.next.send(encodeControl({ t: "op", op: 0, count: L, dtype: "float32" }));
    await rogue.next.send(
      encodeChunk({ phase: 0, op: 0, chunk: 0, offset: 500, count: 499 }, new Float32Array(499).fill(1)),
    );
    const err = await result.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ProtocolError);
    expect((err as Error).message).toMatch(/expected op 0 phase 0 chunk 0 offset 500 count 500, got .* count 499/);
    expect(bitsEqual(buf, before)).toBe(true);
    await waitClosed(rogue.next.ws);
    await expect(ring.allReduce(buf)).rejects.toBe(err);
  });

  it("a payload that does not match its count is rejected before summing", async () => {
    const h = await startRing(2, { manual: [1] });
    const buf = randomBuffer(8, 2);
    const before = buf.slice();
    const result = h.rings[0].allReduce(buf);
    const good = encodeChunk({ phase: 0, op: 0, chunk: 0, offset: 4, count: 4 }, new Float32Array(4).fill(1));
    await h.nodes[1].next.send(encodeControl({ t: "op", op: 0, count: 8, dtype: "float32" }));
    await h.nodes[1].next.send(good.subarray(0, good.length - 4));
    await expect(result).rejects.toThrow(/payload is 12 bytes but count 4 needs 16/);
    expect(bitsEqual(buf, before)).toBe(true);
  });

  it("a wrong op count drops the link and leaves the buffer untouched", async () => {
    const h = await startRing(2, { manual: [1] });
    const buf = randomBuffer(100, 3);
    const before = buf.slice();
    const result = h.rings[0].allReduce(buf);
    await h.nodes[1].next.send(encodeControl({ t: "op", op: 0, count: 101, dtype: "float32" }));
    await h.nodes[1].next.send(
      encodeChunk({ phase: 0, op: 0, chunk: 0, offset: 51, count: 50 }, new Float32Array(50).fill(1)),
    );
    const err = await result.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ProtocolError);
    expect((err as Error).message).toMatch(/announced op 0 with 101 elements, the local buffer has 100/);
    expect(bitsEqual(buf, before)).toBe(true);
    const code = await waitClosed(h.nodes[1].next.ws);
    expect(code).toBe(4003);
  });

  it("a wrong op count that arrives before the local call is caught when the op starts", async () => {
    const h = await startRing(2, { manual: [1] });
    await h.nodes[1].next.send(encodeControl({ t: "op", op: 0, count: 7, dtype: "float32" }));
    await h.nodes[1].next.send(
      encodeChunk({ phase: 0, op: 0, chunk: 0, offset: 4, count: 3 }, new Float32Array(3).fill(1)),
    );
    await sleep(50);
    const buf = randomBuffer(6, 4);
    const before = buf.slice();
    await expect(h.rings[0].allReduce(buf)).rejects.toThrow(/announced op 0 with 7 elements, the local buffer has 6/);
    expect(bitsEqual(buf, before)).toBe(true);
  });

  it("an oversized frame closes the socket with 1009 and rejects the op", async () => {
    const h = await startRing(2, { manual: [1] });
    const result = h.rings[0].allReduce(new Float32Array(1_000_000));
    const rogue = h.nodes[1].next;
    await rogue.send(encodeControl({ t: "op", op: 0, count: 1_000_000, dtype: "float32" }));
    const big = 200_000; // 800 KB > MAX_FRAME_BYTES
    await rogue.send(encodeChunk({ phase: 0, op: 0, chunk: 0, offset: 500_000, count: big }, new Float32Array(big)));
    const err = await result.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LinkLostError);
    expect((err as LinkLostError).neighbour).toBe("prev");
    expect((err as LinkLostError).code).toBe(1009);
    expect((err as Error).message).toMatch(/neighbour prev \(rank 1\).*1009/);
    expect(await waitClosed(rogue.ws)).toBe(1009);
  });

  it("a neighbour that disconnects mid-op rejects the op, naming it", async () => {
    const h = await startRing(3, { chunkBytes: 4096 });
    const L = 3_000_000;
    const r0 = h.rings[0].allReduce(randomBuffer(L, 1)).catch((e: unknown) => e);
    const r1 = h.rings[1].allReduce(randomBuffer(L, 2)).catch((e: unknown) => e);
    await sleep(30);
    // rank 2 (never joined this op) vanishes: rank 0 loses prev, rank 1 loses next
    h.nodes[2].next.terminate();
    h.nodes[2].prev.terminate();
    const [e0, e1] = await Promise.all([r0, r1]);
    expect(e0).toBeInstanceOf(LinkLostError);
    expect((e0 as Error).message).toMatch(/neighbour prev \(rank 2\) disconnected/);
    expect(e1).toBeInstanceOf(LinkLostError);
    expect((e1 as Error).message).toMatch(/neighbour next \(rank 2\) disconnected/);
  });

  it("abort rejects the op in flight", async () => {
    const h = await startRing(2);
    const p = h.rings[0].allReduce(new Float32Array(10));
    h.rings[0].abort("job cancelled");
    await expect(p).rejects.toThrow(/aborted: job cancelled/);
    await expect(h.rings[1].allReduce(new Float32Array(10))).rejects.toThrow(/neighbour/);
  });
});

describe("backpressure", () => {
  it("a slow reader does not let the sender buffer beyond the high-water mark + one frame", async () => {
    const hwm = 512 * 1024;
    const chunkBytes = 64 * 1024;
    const frame = chunkBytes + 24;
    const h = await startRing(2, { highWaterMark: hwm, chunkBytes });
    const sender = h.nodes[0].next;
    const slow = h.nodes[1].prev; // server side of rank 0 -> rank 1
    let peakBuffered = 0;
    const sampler = setInterval(() => {
      peakBuffered = Math.max(peakBuffered, sender.ws.bufferedAmount);
    }, 1);
    try {
      slow.ws.pause();
      const L = 16 * 1024 * 1024; // 64 MB per rank, 32 MB sent by each
      const a = randomBuffer(L, 1);
      const b = randomBuffer(L, 2);
      const want = a[12345] + b[12345];
      const done = Promise.all([h.rings[0].allReduce(a), h.rings[1].allReduce(b)]);
      await sleep(300);
      expect(h.rings[0].opsCompleted).toBe(0);
      // the sender hit the mark and waited instead of queueing 32 MB in ws
      expect(sender.peakPendingBytes).toBeGreaterThan(hwm);
      expect(sender.pendingBytes).toBeLessThanOrEqual(hwm + frame);
      slow.ws.resume();
      await done;
      expect(a[12345]).toBe(b[12345]);
      expect(a[12345]).toBeCloseTo(want, 5);
    } finally {
      clearInterval(sampler);
    }
    expect(sender.peakPendingBytes).toBeLessThanOrEqual(hwm + frame);
    expect(peakBuffered).toBeLessThanOrEqual(hwm + frame + 1024); // + ws frame headers
  }, 60_000);
});

