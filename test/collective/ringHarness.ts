/**
 * Test harness: N real WebSocket servers on 127.0.0.1 (port 0), rank r connected to
 * rank r+1 through connectRingPeer / acceptRingPeer. `close()` tears everything down.
 */
import type { Server } from "node:https";
import type WebSocket from "ws";
import type { WebSocketServer } from "ws";
import { RingAllReduce } from "../../src/collective/ring.js";
import { acceptRingPeer, connectRingPeer, type FrameLink } from "../../src/net/link.js";
import { MAX_FRAME_BYTES } from "../../src/protocol/frames.js";
import { closeTlsServer, ringMember, startTlsServer } from "../helpers/tls.js";

export const JOB = "job-test";

export interface HarnessOptions {
  chunkBytes?: number;
  maxPayload?: number;
  highWaterMark?: number;
  /** RingOptions.maxBlobBytes for every ring */
  maxBlobBytes?: number;
  /** Ranks that get links but no RingAllReduce (the test drives them by hand). */
  manual?: number[];
}

export interface RingNode {
  rank: number;
  server: WebSocketServer;
  https: Server;
  url: string;
  next: FrameLink;
  prev: FrameLink;
  ring: RingAllReduce | null;
}

export interface Harness {
  nodes: RingNode[];
  rings: RingAllReduce[];
  close(): Promise<void>;
}

const live = new Set<Harness>();

/** A member's /ring server over TLS; `member` is its identity and credential (helpers/tls.ts). */
export async function startServer(maxPayload = MAX_FRAME_BYTES, member = ringMember(JOB, [0])) {
  const s = await startTlsServer(member.identity, { path: "/ring", maxPayload, perMessageDeflate: false });
  return { ...s, url: `wss://127.0.0.1:${s.port}/ring`, member };
}

export async function closeServer(s: { server: WebSocketServer; https: Server }): Promise<void> {
  await closeTlsServer(s);
}

export async function startRing(size: number, opts: HarnessOptions = {}): Promise<Harness> {
  const servers = await Promise.all(Array.from({ length: size }, (_, rank) => startServer(opts.maxPayload, ringMember(JOB, [rank]))));
  const clientLinks: FrameLink[] = [];
  const accepted = servers.map(
    ({ server, member }, rank) =>
      new Promise<FrameLink>((resolve, reject) => {
        server.on("connection", (ws: WebSocket) => {
          acceptRingPeer(ws, (hello, binding) => member.auth.admitRingPeer(hello, binding, member.ringJob), 2000, {
            highWaterMark: opts.highWaterMark,
          }).then(({ from, to, link }) => {
            if (from !== (rank - 1 + size) % size || to !== rank) reject(new Error(`bad hello ${from}->${to}`));
            else resolve(link);
          }, reject);
        });
      }),
  );
  for (let rank = 0; rank < size; rank++) {
    const to = (rank + 1) % size;
    clientLinks.push(
      await connectRingPeer(servers[to].url, servers[rank].member.hello(rank, to), {
        highWaterMark: opts.highWaterMark,
        maxPayload: opts.maxPayload,
        expectKey: servers[to].member.identity.key,
      }),
    );
  }
  const prevLinks = await Promise.all(accepted);
  const manual = new Set(opts.manual ?? []);
  const nodes: RingNode[] = servers.map(({ server, https, url }, rank) => ({
    rank,
    server,
    https,
    url,
    next: clientLinks[rank],
    prev: prevLinks[rank],
    ring: manual.has(rank)
      ? null
      : new RingAllReduce({
          rank,
          size,
          next: clientLinks[rank],
          prev: prevLinks[rank],
          chunkBytes: opts.chunkBytes,
          maxBlobBytes: opts.maxBlobBytes,
        }),
  }));
  const harness: Harness = {
    nodes,
    rings: nodes.map((n) => n.ring).filter((r): r is RingAllReduce => r !== null),
    async close() {
      live.delete(harness);
      for (const n of nodes) {
        n.ring?.close();
        n.next.terminate();
        n.prev.terminate();
      }
      await Promise.all(nodes.map((n) => closeServer(n)));
    },
  };
  live.add(harness);
  return harness;
}

/** Close every harness still open (call from afterEach). */
export async function closeAll(): Promise<void> {
  await Promise.all([...live].map((h) => h.close()));
}

export function randomBuffer(length: number, seed: number): Float32Array {
  let s = seed >>> 0 || 1;
  const out = new Float32Array(length);
  for (let i = 0; i < length; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    out[i] = (s / 0x100000000) * 2 - 1;
  }
  return out;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Same float32 bit patterns (NaN payloads and -0 included). */
export function bitsEqual(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
  return true;
}

/** Fresh random buffers, one per rank, with their exact (float64) sum and the sum of magnitudes. */
export function randomInputs(ranks: number, length: number, seed: number): { inputs: Float32Array[]; exact: Float64Array; magnitude: Float64Array } {
  const inputs = Array.from({ length: ranks }, (_, r) => randomBuffer(length, seed * 31 + r + 1));
  const exact = new Float64Array(length);
  const magnitude = new Float64Array(length);
  for (const buf of inputs) {
    for (let i = 0; i < length; i++) {
      exact[i] += buf[i];
      magnitude[i] += Math.abs(buf[i]);
    }
  }
  return { inputs, exact, magnitude };
}

/** The close code of a socket, once it has closed. */
export function waitClosed(ws: import("ws").WebSocket): Promise<number> {
  if (ws.readyState === ws.CLOSED) return Promise.resolve((ws as unknown as { _closeCode: number })._closeCode);
  return new Promise((resolve) => ws.once("close", (code: number) => resolve(code)));
}
