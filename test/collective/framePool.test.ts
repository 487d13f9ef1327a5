import { afterEach, describe, expect, it } from "vitest";
import { FramePool } from "../../src/collective/framePool.js";
import { LinkClosedError } from "../../src/net/link.js";
import { closeAll, startRing } from "./ringHarness.js";

afterEach(async () => {
  await closeAll();
});

describe("FramePool", () => {
  it("hands back given buffers instead of allocating, and holds at most max", () => {
    const pool = new FramePool(1000, 2);
    const a = pool.take();
    const b = pool.take();
    const c = pool.take();
    expect(a.byteLength).toBe(1000);
    expect(a).not.toBe(b);
    pool.give(a);
    pool.give(b);
    pool.give(c);
    expect(pool.size).toBe(2);
    expect([a, b]).toContain(pool.take());
  });
});

describe("FrameLink.send onWritten (when a send buffer may be reused)", () => {
  it("is called once per frame, after the frame was handed to the socket, and at once on a closed link", async () => {
    const h = await startRing(2, { manual: [0, 1] });
    const link = h.nodes[0].next;
    const got: number[] = [];
    h.nodes[1].prev.onFrame((bytes) => got.push(bytes.byteLength));
    let written = 0;
    const frames = 20;
    for (let i = 0; i < frames; i++) await link.send(new Uint8Array(100_000), () => written++);
    while (got.length < frames) await new Promise((r) => setTimeout(r, 5));
    expect(written).toBe(frames);
    link.close();
    let late = 0;
    await expect(link.send(new Uint8Array(10), () => late++)).rejects.toBeInstanceOf(LinkClosedError);
    expect(late).toBe(1);
  });
});
