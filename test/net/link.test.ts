import { afterEach, describe, expect, it } from "vitest";
import WebSocket, { type WebSocketServer } from "ws";
import { ProtocolError } from "../../src/errors.js";
import {
  acceptRingPeer,
  connectLink,
  connectRingPeer,
  FrameLink,
  LinkClosedError,
} from "../../src/net/link.js";
import { secretsEqual, TokenAuthorizer } from "../../src/net/auth.js";

const auth = new TokenAuthorizer("t");
const admitting = (ranks: number[]) => (hello: Parameters<TokenAuthorizer["admitRingPeer"]>[0]) => auth.admitRingPeer(hello, { job: "j", secret: "s", ranks: new Set(ranks) });
import { decodeFrame, encodeControl } from "../../src/protocol/frames.js";
import { closeServer, startServer } from "../collective/ringHarness.js";

const servers: WebSocketServer[] = [];
const links: FrameLink[] = [];

afterEach(async () => {
  for (const l of links.splice(0)) l.terminate();
  await Promise.all(servers.splice(0).map(closeServer));
});

/** A server whose connections go through acceptRingPeer for job "j", secret "s", rank 1. */
async function ringServer(timeoutMs = 2000) {
  const { server, url } = await startServer();
  servers.push(server);
  const accepted: Array<Promise<{ from: number; to: number; link: FrameLink }>> = [];
  server.on("connection", (ws: WebSocket) => {
    const p = acceptRingPeer(ws, admitting([1]), timeoutMs);
    p.then(({ link }) => links.push(link), () => {});
    accepted.push(p);
  });
  /** The next connection's acceptRingPeer promise (wrapped, so awaiting this does not settle it). */
  const nextAccepted = async (): Promise<{ p: Promise<{ from: number; to: number; link: FrameLink }> }> => {
    while (accepted.length === 0) await new Promise((r) => setTimeout(r, 5));
    return { p: accepted.shift()! };
  };
  return { url, nextAccepted };
}

function closeCode(link: FrameLink): Promise<number> {
  return new Promise((resolve) => link.onClose((code) => resolve(code)));
}

describe("ring connection auth", () => {
  it("accepts a good hello and delivers later frames in order", async () => {
    const { url, nextAccepted } = await ringServer();
    const link = await connectRingPeer(url, { job: "j", secret: "s", from: 0, to: 1 });
    links.push(link);
    for (let i = 0; i < 3; i++) await link.send(encodeControl({ t: "op", op: i, count: 1, dtype: "float32" }));
    const { from, to, link: server } = await (await nextAccepted()).p;
    expect([from, to]).toEqual([0, 1]);
    await new Promise((r) => setTimeout(r, 30)); // frames queue until a listener is set
    const got: number[] = [];
    await new Promise<void>((resolve) => {
      server.onFrame((bytes) => {
        const frame = decodeFrame(bytes);
        if (frame.kind === "control" && frame.msg.t === "op") got.push(frame.msg.op);
        if (got.length === 3) resolve();
      });
    });
    expect(got).toEqual([0, 1, 2]);
    expect(server.framesReceived).toBe(4);
    expect(link.bytesSent).toBeGreaterThan(0);
  });

  for (const [name, hello, code, message] of [
    // One reason for both: a refusal does not confirm a job id.
    ["wrong secret", { job: "j", secret: "nope", from: 0, to: 1 }, 4001, /ring hello rejected: wrong job or secret$/],
    ["wrong job", { job: "other", secret: "s", from: 0, to: 1 }, 4001, /ring hello rejected: wrong job or secret$/],
    ["a rank not hosted here", { job: "j", secret: "s", from: 0, to: 2 }, 4002, /rank 2/],
  ] as const) {
    it(`rejects ${name}`, async () => {
      const { url, nextAccepted } = await ringServer();
      const link = await connectRingPeer(url, hello);
      links.push(link);
      const closed = closeCode(link);
      const err = await (await nextAccepted()).p.catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ProtocolError);
      expect((err as Error).message).toMatch(message);
      expect(await closed).toBe(code);
      await expect(link.send(new Uint8Array([1]))).rejects.toBeInstanceOf(LinkClosedError);
    });
  }

  it("rejects a first frame that is not hello, and a silent peer", async () => {
    const { url, nextAccepted } = await ringServer(100);
    const a = await connectLink(url);
    links.push(a);
    const closedA = closeCode(a);
    await a.send(encodeControl({ t: "op", op: 0, count: 1, dtype: "float32" }));
    await expect((await nextAccepted()).p).rejects.toThrow(/must be hello/);
    expect(await closedA).toBe(4001);

    const b = await connectLink(url);
    links.push(b);
    const closedB = closeCode(b);
    await expect((await nextAccepted()).p).rejects.toThrow(/no hello within 100 ms/);
    expect(await closedB).toBe(4002);
  });

  it("authenticates a link whose hello arrived before acceptRingPeer was called", async () => {
    const { server, url } = await startServer();
    servers.push(server);
    const early = new Promise<FrameLink>((resolve) =>
      server.on("connection", (ws: WebSocket) => resolve(new FrameLink(ws))),
    );
    const client = await connectRingPeer(url, { job: "j", secret: "s", from: 4, to: 5 });
    links.push(client);
    await client.send(encodeControl({ t: "op", op: 0, count: 3, dtype: "float32" }));
    const held = await early;
    links.push(held);
    await new Promise((r) => setTimeout(r, 50)); // hello and op have arrived by now
    const { from, to, link } = await acceptRingPeer(held, admitting([5]), 1000);
    expect([from, to, link]).toEqual([4, 5, held]);
    const frame = await new Promise<Uint8Array>((resolve) => link.onFrame(resolve));
    expect(decodeFrame(frame)).toMatchObject({ kind: "control", msg: { t: "op", count: 3 } });
  });

  it("refuses URLs that are not /ring and compares secrets", async () => {
    await expect(connectRingPeer("ws://127.0.0.1:1/other", { job: "j", secret: "s", from: 0, to: 1 })).rejects.toThrow(
      /must end in \/ring/,
    );
    await expect(connectLink("ws://127.0.0.1:1/ring", { handshakeTimeoutMs: 500 })).rejects.toThrow(/cannot connect/);
    expect(secretsEqual("abc", "abc")).toBe(true);
    expect(secretsEqual("abc", "abcd")).toBe(false);
  });
});

describe("latency testing aid", () => {
  it("hands each frame, then the close, to listeners no sooner than the one-way latency after it arrived, in order", async () => {
    const { server, url } = await startServer();
    servers.push(server);
    const latencyMs = 80;
    const arrived = new Promise<FrameLink>((resolve) => server.on("connection", (ws: WebSocket) => resolve(new FrameLink(ws, { latencyMs }))));
    const sender = await connectLink(url);
    links.push(sender);
    const receiver = await arrived;
    links.push(receiver);
    const got: Array<{ i: number; after: number }> = [];
    const sentAt: number[] = [];
    receiver.onFrame((bytes) => got.push({ i: bytes[0], after: performance.now() - sentAt[bytes[0]] }));
    const closed = new Promise<number>((resolve) => receiver.onClose(() => resolve(performance.now())));
    for (let i = 0; i < 5; i++) {
      sentAt.push(performance.now());
      await sender.send(new Uint8Array([i, 1, 2, 3]));
      await new Promise((r) => setTimeout(r, 10));
    }
    const closeSentAt = performance.now();
    sender.close(1000, "done");
    const closedAt = await closed;
    expect(got.map((g) => g.i)).toEqual([0, 1, 2, 3, 4]);
    // Lower bounds only: a busy host may deliver later, never sooner (1 ms timer rounding).
    for (const g of got) expect(g.after).toBeGreaterThanOrEqual(latencyMs - 1);
    expect(closedAt - closeSentAt).toBeGreaterThanOrEqual(latencyMs - 1);
    expect(receiver.bytesReceived).toBe(20);
  });
});
