import { afterEach, describe, expect, it } from "vitest";
import type WebSocket from "ws";
import { ProtocolError } from "../../src/errors.js";
import { secretsEqual } from "../../src/net/auth.js";
import { ephemeralIdentity } from "../../src/identity/identity.js";
import { acceptRingPeer, connectLink, connectRingPeer, FrameLink, LinkClosedError, RING_BINDING, type RingHello } from "../../src/net/link.js";
import { issueCredential } from "../../src/identity/proof.js";
import { sessionBinding } from "../../src/net/tls.js";
import { decodeFrame, encodeControl } from "../../src/protocol/frames.js";
import { closeServer, startServer } from "../collective/ringHarness.js";
import { ringMember } from "../helpers/tls.js";

const servers: Parameters<typeof closeServer>[0][] = [];
const links: FrameLink[] = [];
/** The host serving rank 1 of job "j", and the one dialling in as rank 0. */
const host = ringMember("j", [1]);
const peer = ringMember("j", [0]);

afterEach(async () => {
  for (const l of links.splice(0)) l.terminate();
  await Promise.all(servers.splice(0).map(closeServer));
});

/** A server whose connections go through acceptRingPeer for job "j", rank 1, as `host`. */
async function ringServer(timeoutMs = 2000, member = host) {
  const started = await startServer(undefined, member);
  servers.push(started);
  const accepted: Array<Promise<{ from: number; to: number; link: FrameLink }>> = [];
  started.server.on("connection", (ws: WebSocket) => {
    const p = acceptRingPeer(ws, (hello, binding) => member.auth.admitRingPeer(hello, binding, member.ringJob), timeoutMs);
    p.then(({ link }) => links.push(link), () => {});
    accepted.push(p);
  });
  /** The next connection's acceptRingPeer promise (wrapped, so awaiting this does not settle it). */
  const nextAccepted = async (): Promise<{ p: Promise<{ from: number; to: number; link: FrameLink }> }> => {
    while (accepted.length === 0) await new Promise((r) => setTimeout(r, 5));
    return { p: accepted.shift()! };
  };
  return { url: started.url, nextAccepted, key: member.identity.key };
}

function closeCode(link: FrameLink): Promise<number> {
  return new Promise((resolve) => link.onClose((code) => resolve(code)));
}

/** Open a TLS link and send `hello` as made by `make` on its session (what a hostile peer controls). */
async function sayHello(url: string, make: (binding: Buffer) => RingHello): Promise<FrameLink> {
  const link = await connectLink(url);
  links.push(link);
  await link.send(encodeControl({ t: "hello", ...make(sessionBinding(link.ws, RING_BINDING)!) }));
  return link;
}

describe("ring connection auth", () => {
  it("accepts a job member's hello and delivers later frames in order", async () => {
    const { url, nextAccepted, key } = await ringServer();
    const link = await connectRingPeer(url, peer.hello(0, 1), { expectKey: key });
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
    expect(link.bytesSent).toBeGreaterThan(0);
  });

  const impostor = ephemeralIdentity();
  const otherCoordinator = ephemeralIdentity();
  for (const [name, make, code] of [
    // One reason for all: a refusal does not confirm a job id.
    ["a hello for another job", (b: Buffer) => ({ ...peer.hello(0, 1)(b), job: "other" }), 4001],
    ["a credential another coordinator signed", (b: Buffer) => ({ ...peer.hello(0, 1)(b), credential: issueCredential(otherCoordinator, "j", peer.identity.key, [0]) }), 4001],
    ["a credential for other ranks", (b: Buffer) => ringMember("j", [2], peer.identity).hello(0, 1)(b), 4001],
    ["a credential of another key", (b: Buffer) => ({ ...ringMember("j", [0], impostor).hello(0, 1)(b), credential: peer.credential }), 4001],
    ["a proof made on another TLS session (a replay)", () => peer.hello(0, 1)(Buffer.alloc(32, 7)), 4001],
    ["a rank not hosted here", (b: Buffer) => ringMember("j", [0], peer.identity).hello(0, 2)(b), 4002],
  ] as const) {
    it(`rejects ${name}`, async () => {
      const { url, nextAccepted } = await ringServer();
      const link = await sayHello(url, make);
      const closed = closeCode(link);
      const err = await (await nextAccepted()).p.catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ProtocolError);
      expect((err as Error).message).toMatch(code === 4001 ? /ring hello rejected: not a member of this job$/ : /rank 2/);
      expect(await closed).toBe(code);
      await expect(link.send(new Uint8Array([1]))).rejects.toBeInstanceOf(LinkClosedError);
    });
  }

  it("refuses a replayed hello: the very frame a member sent, sent again on a new connection", async () => {
    const { url, nextAccepted, key } = await ringServer();
    let recorded: RingHello | null = null;
    const first = await connectRingPeer(url, (b) => (recorded = peer.hello(0, 1)(b)), { expectKey: key });
    links.push(first);
    await (await nextAccepted()).p;
    const replay = await sayHello(url, () => recorded!);
    const closed = closeCode(replay);
    await expect((await nextAccepted()).p).rejects.toThrow(/not a member of this job/);
    expect(await closed).toBe(4001);
  });

  it("refuses to say hello to a host whose certificate is not the expected key (a man in the middle)", async () => {
    const mitm = await ringServer(2000, ringMember("j", [1], impostor));
    await expect(connectRingPeer(mitm.url, peer.hello(0, 1), { expectKey: host.identity.key })).rejects.toThrow(
      /certificate's key .* is not the expected .* \(a different host, or someone in between\)/,
    );
    // The proxy saw a TLS connection and nothing else: no hello to relay.
    await expect((await mitm.nextAccepted()).p).rejects.toThrow(/closed .* before hello|no hello/);
  });

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
    const member = ringMember("j", [5]);
    const started = await startServer(undefined, member);
    servers.push(started);
    const early = new Promise<FrameLink>((resolve) => started.server.on("connection", (ws: WebSocket) => resolve(new FrameLink(ws))));
    const client = await connectRingPeer(started.url, ringMember("j", [4]).hello(4, 5), { expectKey: member.identity.key });
    links.push(client);
    await client.send(encodeControl({ t: "op", op: 0, count: 3, dtype: "float32" }));
    const held = await early;
    links.push(held);
    await new Promise((r) => setTimeout(r, 50)); // hello and op have arrived by now
    const { from, to, link } = await acceptRingPeer(held, (h, binding) => member.auth.admitRingPeer(h, binding, member.ringJob), 1000);
    expect([from, to, link]).toEqual([4, 5, held]);
    const frame = await new Promise<Uint8Array>((resolve) => link.onFrame(resolve));
    expect(decodeFrame(frame)).toMatchObject({ kind: "control", msg: { t: "op", count: 3 } });
  });

  it("refuses URLs that are not /ring and compares secrets", async () => {
    await expect(connectRingPeer("wss://127.0.0.1:1/other", peer.hello(0, 1))).rejects.toThrow(/must end in \/ring/);
    await expect(connectLink("wss://127.0.0.1:1/ring", { handshakeTimeoutMs: 500 })).rejects.toThrow(/cannot connect/);
    expect(secretsEqual("abc", "abc")).toBe(true);
    expect(secretsEqual("abc", "abcd")).toBe(false);
  });
});

describe("latency testing aid", () => {
  it("hands each frame, then the close, to listeners no sooner than the one-way latency after it arrived, in order", async () => {
    const started = await startServer();
    const { server, url } = started;
    servers.push(started);
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
