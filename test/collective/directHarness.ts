/**
 * Test harness for the direct all-reduce: N real TLS WebSocket servers on 127.0.0.1, and a
 * one-way link from every member to every other (connectRingPeer / acceptRingPeer), as the
 * pair groups of a provider make them. `close()` tears everything down.
 */
import type WebSocket from "ws";
import { DirectAllReduce, type DirectPeer } from "../../src/collective/direct.js";
import { acceptRingPeer, connectRingPeer, type FrameLink } from "../../src/net/link.js";
import { ringMember } from "../helpers/tls.js";
import { closeServer, JOB, startServer } from "./ringHarness.js";

export interface DirectNode {
  position: number;
  /** links[q]: to q (send) and from q (recv); null at its own position */
  links: Array<{ send: FrameLink; recv: FrameLink } | null>;
  reducer: DirectAllReduce | null;
}

export interface DirectHarness {
  nodes: DirectNode[];
  reducers: DirectAllReduce[];
  close(): Promise<void>;
}

const live = new Set<DirectHarness>();

export async function startDirect(size: number, opts: { chunkBytes?: number; highWaterMark?: number; manual?: number[]; maxBufferedBytes?: number } = {}): Promise<DirectHarness> {
  const servers = await Promise.all(Array.from({ length: size }, (_, r) => startServer(undefined, ringMember(JOB, [r]))));
  // incoming[q][p]: the link from p into q
  const incoming: Array<Array<Promise<FrameLink> | null>> = servers.map(() => new Array(size).fill(null));
  const resolvers: Array<Array<((l: FrameLink) => void) | null>> = servers.map(() => new Array(size).fill(null));
  servers.forEach(({ server, member }, q) => {
    for (let p = 0; p < size; p++) if (p !== q) incoming[q][p] = new Promise<FrameLink>((resolve) => (resolvers[q][p] = resolve));
    server.on("connection", (ws: WebSocket) => {
      acceptRingPeer(ws, (hello, binding) => member.auth.admitRingPeer(hello, binding, member.ringJob), 2000, { highWaterMark: opts.highWaterMark }).then(
        ({ from, to, link }) => {
          if (to !== q || !resolvers[q][from]) throw new Error(`bad hello ${from}->${to}`);
          resolvers[q][from]!(link);
        },
        () => {},
      );
    });
  });
  const outgoing: FrameLink[][] = servers.map(() => []);
  for (let p = 0; p < size; p++) {
    for (let q = 0; q < size; q++) {
      if (p === q) continue;
      outgoing[p][q] = await connectRingPeer(servers[q].url, servers[p].member.hello(p, q), { highWaterMark: opts.highWaterMark, expectKey: servers[q].member.identity.key });
    }
  }
  const manual = new Set(opts.manual ?? []);
  const nodes: DirectNode[] = [];
  for (let p = 0; p < size; p++) {
    const links: DirectNode["links"] = [];
    for (let q = 0; q < size; q++) links.push(p === q ? null : { send: outgoing[p][q], recv: await incoming[p][q]! });
    const peers: DirectPeer[] = links.flatMap((l, q) => (l ? [{ position: q, rank: q, send: l.send, recv: l.recv }] : []));
    nodes.push({ position: p, links, reducer: manual.has(p) ? null : new DirectAllReduce({ position: p, size, peers, chunkBytes: opts.chunkBytes, maxBufferedBytes: opts.maxBufferedBytes }) });
  }
  const harness: DirectHarness = {
    nodes,
    reducers: nodes.map((n) => n.reducer).filter((r): r is DirectAllReduce => r !== null),
    async close() {
      live.delete(harness);
      for (const n of nodes) {
        n.reducer?.close();
        for (const l of n.links) {
          l?.send.terminate();
          l?.recv.terminate();
        }
      }
      await Promise.all(servers.map((s) => closeServer(s)));
    },
  };
  live.add(harness);
  return harness;
}

export async function closeAllDirect(): Promise<void> {
  await Promise.all([...live].map((h) => h.close()));
}
