/**
 * The direct all-reduce's links on providers: a pair group between every two members,
 * each host's DirectMeshes making a DirectAllReduce per local rank once all its pairs are
 * up, re-formed by epoch with the ring, and losses reported as the ring's are.
 */
import { afterEach, describe, expect, it } from "vitest";
import type { WebSocket } from "ws";
import { DirectMeshes, isDirectGroup, pairSpecs } from "../../src/collective/directMesh.js";
import type { RingPeer } from "../../src/collective/mesh.js";
import { LinkLostError } from "../../src/collective/ring.js";
import { acceptRingPeer, FrameLink } from "../../src/net/link.js";
import { ringMember } from "../helpers/tls.js";
import { bitsEqual, closeServer, randomInputs, startServer } from "./ringHarness.js";

const JOB = "direct-mesh-test";
const servers: Parameters<typeof closeServer>[0][] = [];
const meshes: DirectMeshes[] = [];

afterEach(async () => {
  for (const m of meshes.splice(0)) m.close("test over");
  await Promise.all(servers.splice(0).map(closeServer));
});

interface Host {
  rank: number;
  direct: DirectMeshes | null;
  url: RingPeer;
  events: { linked: [number, number][]; lost: string[]; failed: string[] };
}

/** One host per rank, each listening; `start` makes their DirectMeshes once every URL is known. */
async function hosts(ranks: number[], members: number[], minMembers: number): Promise<Host[]> {
  const out: Host[] = [];
  for (const rank of ranks) {
    const member = ringMember(JOB, [rank]);
    const started = await startServer(undefined, member);
    servers.push(started);
    const h: Host = { rank, direct: null, url: { url: started.url, key: member.identity.key }, events: { linked: [], lost: [], failed: [] } };
    started.server.on("connection", (ws: WebSocket) => {
      acceptRingPeer(new FrameLink(ws), (hello, binding) => member.auth.admitRingPeer(hello, binding, member.ringJob), 2000).then(
        (hello) => {
          expect(isDirectGroup(hello.group)).toBe(true);
          h.direct!.accept({ ...hello, group: hello.group! });
        },
        () => {},
      );
    });
    (h as Host & { member: typeof member }).member = member;
    out.push(h);
  }
  const peers = new Map(out.map((h) => [h.rank, h.url]));
  for (const h of out) {
    const member = (h as Host & { member: ReturnType<typeof ringMember> }).member;
    h.direct = new DirectMeshes(
      { local: [h.rank], members, minMembers, peers, heartbeatMs: 10_000, hello: (group, from, to, epoch, binding) => member.auth.ringHello({ job: JOB, credential: member.credential }, from, to, epoch, binding, group) },
      {
        linked: (rank, epoch) => h.events.linked.push([rank, epoch]),
        lost: (_rank, _epoch, reason) => h.events.lost.push(reason),
        fail: (message) => h.events.failed.push(message),
        log: () => {},
        track: () => {},
      },
    );
    meshes.push(h.direct);
  }
  return out;
}

async function until(cond: () => boolean, what: string, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function reduceAll(hs: Host[], length: number, seed: number) {
  const { inputs } = randomInputs(hs.length, length, seed);
  const bufs = inputs.map((b) => b.slice());
  await Promise.all(hs.map((h, k) => h.direct!.reducerOf(h.rank)!.allReduce(bufs[k])));
  for (let k = 1; k < hs.length; k++) expect(bitsEqual(bufs[k], bufs[0])).toBe(true);
  return bufs[0];
}

describe("the direct all-reduce's links", () => {
  it("pairs every two members (none below the minimum)", () => {
    expect(pairSpecs([3, 0, 5]).map((s) => s.id)).toEqual(["direct:0:3", "direct:3:5", "direct:0:5"]);
    expect(pairSpecs([0, 1], 3)).toEqual([]);
    expect(pairSpecs([0, 1], 2)).toHaveLength(1);
    expect(pairSpecs([0, 1, 2, 3], 3, 3)).toEqual([]);
  });

  it("links every pair, makes each rank's all-reduce, and re-forms by epoch without reporting a loss", async () => {
    const hs = await hosts([0, 1, 2, 3], [0, 1, 2, 3], 3);
    for (const h of hs) h.direct!.start();
    await until(() => hs.every((h) => h.direct!.reducerOf(h.rank) !== null && h.direct!.allLinked(h.rank)), "every rank's direct all-reduce");
    expect(hs.map((h) => h.direct!.reducerOf(h.rank)!.size)).toEqual([4, 4, 4, 4]);
    expect(hs.map((h) => h.direct!.reducerOf(h.rank)!.position)).toEqual([0, 1, 2, 3]);
    await reduceAll(hs, 10_001, 1);
    // Rank 1 leaves: the others re-form in epoch 1 with positions in the new members' order.
    const peers = hs.map((h) => ({ rank: h.rank, ...h.url }));
    for (const h of hs) h.direct!.reform(1, [3, 0, 2], peers);
    const stay = [hs[3], hs[0], hs[2]];
    await until(() => stay.every((h) => h.direct!.reducerOf(h.rank) !== null), "epoch 1's all-reduces");
    expect(stay.map((h) => h.direct!.reducerOf(h.rank)!.position)).toEqual([0, 1, 2]);
    expect(hs[1].direct!.reducerOf(1)).toBeNull();
    expect(hs[1].direct!.allLinked(1)).toBe(true);
    await reduceAll(stay, 999, 2);
    for (const h of hs) expect(h.events.lost).toEqual([]);
    // Two members, below auto's minimum of 3: no pairs, the ring alone.
    for (const h of hs) h.direct!.reform(2, [0, 2], peers);
    await new Promise((r) => setTimeout(r, 100));
    expect(hs[0].direct!.reducerOf(0)).toBeNull();
    expect(hs[0].direct!.allLinked(0)).toBe(true);
  });

  it("a pair link that breaks: the op in flight fails naming the peer, and the loss is reported with its group", async () => {
    const hs = await hosts([0, 1, 2], [0, 1, 2], 2);
    for (const h of hs) h.direct!.start();
    await until(() => hs.every((h) => h.direct!.reducerOf(h.rank) !== null), "every rank's direct all-reduce");
    const r0 = hs[0].direct!.reducerOf(0)!;
    const op = r0.allReduce(new Float32Array(100_000)).then(() => null, (e: unknown) => e);
    // Rank 2's host goes away.
    hs[2].direct!.close("host gone");
    const err = await op;
    expect(err).toBeInstanceOf(LinkLostError);
    expect([1, 2]).toContain((err as LinkLostError).peerRank);
    await until(() => hs[0].events.lost.length > 0, "rank 0's loss");
    expect(hs[0].events.lost[0]).toMatch(/\(group direct:0:[12]\)/);
    expect(hs[0].direct!.reducerOf(0)).toBeNull();
  });

  it("abortRounds ends the op in flight", async () => {
    const hs = await hosts([0, 1, 2], [0, 1, 2], 3);
    for (const h of hs) h.direct!.start();
    await until(() => hs.every((h) => h.direct!.reducerOf(h.rank) !== null), "every rank's direct all-reduce");
    const op = hs[1].direct!.reducerOf(1)!.allReduce(new Float32Array(50)).then(() => null, (e: unknown) => e);
    hs[1].direct!.abortRounds("step 7 abandoned");
    expect(String(await op)).toMatch(/aborted: step 7 abandoned/);
  });
});
