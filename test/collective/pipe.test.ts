import { afterEach, describe, expect, it } from "vitest";
import { PipeChannel } from "../../src/collective/pipe.js";
import { encodeBlobChunk, encodeControl } from "../../src/protocol/frames.js";
import { closeAll, startRing } from "./ringHarness.js";

afterEach(closeAll);

/** Two real TLS WebSocket links between ranks 0 and 1 (a ring of two), each end a pipe. */
async function pipePair(opts: { chunkBytes?: number; maxBufferedBytes?: number } = {}) {
  const h = await startRing(2, { manual: [0, 1] });
  const [a, b] = h.nodes;
  const p0 = new PipeChannel({ rank: 0, peer: 1, next: a.next, prev: a.prev, ...opts });
  const p1 = new PipeChannel({ rank: 1, peer: 0, next: b.next, prev: b.prev, ...opts });
  return { h, p0, p1 };
}

function bytes(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i * 31 + seed) & 0xff;
  return out;
}

describe("PipeChannel", () => {
  it("carries tagged messages both ways, in chunks, whether asked for before or after they arrive", async () => {
    const { p0, p1 } = await pipePair({ chunkBytes: 1000 });
    const act0 = bytes(12_345, 1);
    const act1 = bytes(0, 2);
    const s0 = await p0.send("f:0:0:0", act0);
    expect(s0.frames).toBe(1 + Math.ceil(12_345 / 1000));
    await p0.send("f:0:0:1", act1);
    // Asked for in the other order: the first waits in the mailbox.
    expect(await p1.recv("f:0:0:1")).toEqual(act1);
    expect(await p1.recv("f:0:0:0")).toEqual(act0);
    const grad = bytes(5000, 3);
    const waiting = p0.recv("b:0:0:0");
    await p1.send("b:0:0:0", grad);
    expect(await waiting).toEqual(grad);
    expect(p0.bytesSent).toBeGreaterThan(12_345);
  });

  it("breaks on a malformed or out-of-order frame, rejecting what waits", async () => {
    const { h, p1 } = await pipePair();
    const waiting = p1.recv("f:0:0:0");
    // A blob chunk with no announcement, straight onto rank 0's outgoing link.
    await h.nodes[0].next.send(encodeBlobChunk({ phase: 0, op: 0, owner: 0, total: 4, offset: 0, length: 4 }, new Uint8Array(4)));
    await expect(waiting).rejects.toThrow(/without a pipe announcement/);
    expect(p1.error).not.toBeNull();
  });

  it("refuses a tag sent twice and a message over the buffer bound", async () => {
    const { h, p1 } = await pipePair({ maxBufferedBytes: 100 });
    const link = h.nodes[0].next;
    await link.send(encodeControl({ t: "op", kind: "pipe", op: 0, tag: "x", size: 2 }));
    await link.send(encodeBlobChunk({ phase: 0, op: 0, owner: 0, total: 2, offset: 0, length: 2 }, new Uint8Array(2)));
    await link.send(encodeControl({ t: "op", kind: "pipe", op: 1, tag: "x", size: 2 }));
    await expect(p1.recv("y")).rejects.toThrow(/tag x twice/);

    const other = await pipePair({ maxBufferedBytes: 100 });
    await other.h.nodes[0].next.send(encodeControl({ t: "op", kind: "pipe", op: 0, tag: "big", size: 1000 }));
    await expect(other.p1.recv("z")).rejects.toThrow(/no one asked for yet/);
  });

  it("abort rejects a waiting receive and closes the links", async () => {
    const { p0, p1 } = await pipePair();
    const waiting = p0.recv("b:1:0:0");
    p0.abort("step 1 abandoned");
    await expect(waiting).rejects.toThrow(/aborted: step 1 abandoned/);
    await expect(p0.send("f:1:0:0", new Uint8Array(1))).rejects.toThrow(/aborted/);
    // The peer sees its links close.
    await expect(p1.recv("f:1:0:0")).rejects.toThrow(/disconnected/);
  });
});
