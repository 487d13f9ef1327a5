import { afterEach, describe, expect, it } from "vitest";
import type { WebSocket } from "ws";
import { CLOSE_REFORM, Mesh, type MeshEvents } from "../../src/collective/mesh.js";
import type { RingPeer } from "../../src/collective/mesh.js";
import { acceptRingPeer, connectRingPeer, FrameLink } from "../../src/net/link.js";
import { ringMember } from "../helpers/tls.js";
import { closeServer, startServer } from "./ringHarness.js";

const JOB = "mesh-test";
/** Another host of the job, which dials in by hand. */
const other = ringMember(JOB, [0]);
const servers: Parameters<typeof closeServer>[0][] = [];
const meshes: Mesh[] = [];

afterEach(async () => {
  for (const m of meshes.splice(0)) m.close("test over");
  await Promise.all(servers.splice(0).map(closeServer));
});

/** One host running `local` ranks of a job whose ranks `all` each listen at their own URL (all on this host). */
async function host(local: number[], members: number[], holdEarlyMs?: number) {
  const urls = new Map<number, RingPeer>();
  const member = ringMember(JOB, local);
  const events: { linked: [number, number, number][]; lost: [number, number, string][]; failed: string[] } = { linked: [], lost: [], failed: [] };
  let mesh: Mesh | null = null;
  for (const rank of local) {
    const started = await startServer(undefined, member);
    const { server, url } = started;
    servers.push(started);
    urls.set(rank, { url, key: member.identity.key });
    server.on("connection", (ws: WebSocket) => {
      const link = new FrameLink(ws);
      acceptRingPeer(link, (hello, binding) => member.auth.admitRingPeer(hello, binding, member.ringJob), 2000).then(
        (hello) => mesh!.accept(hello),
        () => {},
      );
    });
  }
  const handlers: MeshEvents = {
    linked: (rank, epoch, _ring, size) => events.linked.push([rank, epoch, size]),
    lost: (rank, epoch, reason) => events.lost.push([rank, epoch, reason]),
    fail: (message) => events.failed.push(message),
    log: () => {},
    track: () => {},
  };
  mesh = new Mesh({ local, members, peers: urls, hello: (from, to, epoch, binding) => member.hello(from, to, epoch)(binding), heartbeatMs: 10_000, holdEarlyMs }, handlers);
  meshes.push(mesh);
  return { mesh, urls, events };
}

async function until(cond: () => boolean, what: string, ms = 5000) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe("the mesh: ring links by epoch", () => {
  it("links every local member of the starting ring, and again in each new epoch", async () => {
    const { mesh, events } = await host([0, 1, 2], [0, 1, 2]);
    mesh.start();
    await until(() => events.linked.length === 3, "three ranks linked");
    expect(events.linked.map(([rank, epoch, size]) => [rank, epoch, size]).sort()).toEqual([
      [0, 0, 3],
      [1, 0, 3],
      [2, 0, 3],
    ]);
    expect(mesh.isLinked(1) && mesh.ringOf(1)).toBeTruthy();
    // Re-formed without rank 1: the old links close as a re-form (no loss), ranks 0 and 2 link anew.
    expect(mesh.reform(1, [0, 2], [])).toEqual([1]);
    expect(mesh.inRing(1)).toBe(false);
    await until(() => events.linked.filter(([, epoch]) => epoch === 1).length === 2, "ranks 0 and 2 linked in epoch 1");
    expect(events.linked.filter(([, epoch]) => epoch === 1).map(([rank, , size]) => [rank, size]).sort()).toEqual([
      [0, 2],
      [2, 2],
    ]);
    expect(events.lost).toEqual([]);
    expect(mesh.neighbours(2)).toEqual({ position: 1, prev: 0, next: 0 });
  });

  it("refuses a stale epoch, a backward one and unknown ranks", async () => {
    const { mesh, events } = await host([0, 1], [0, 1]);
    mesh.start();
    await until(() => events.linked.length === 2, "linked");
    expect(() => mesh.reform(0, [0, 1], [])).toThrow("ring epoch 0 is not after 0");
    expect(() => mesh.reform(2, [0, 0], [])).toThrow(/not distinct ranks/);
    expect(() => mesh.reform(2, [0, 7], [])).toThrow(/with known addresses/);
    mesh.reform(2, [0, 1], []);
    // A hello of an older epoch is closed as a re-form.
    const peer = mesh.peerOf(1)!;
    const stale = await connectRingPeer(peer.url, other.hello(0, 1, 1), { expectKey: peer.key });
    const closed = await new Promise<number>((resolve) => stale.onClose((code) => resolve(code)));
    expect(closed).toBe(CLOSE_REFORM);
  });

  it("holds a hello for an epoch it has not reached, and attaches it when it does", async () => {
    const a = await host([0], []);
    const b = await host([1], []);
    const urls = [
      { rank: 0, ...a.urls.get(0)! },
      { rank: 1, ...b.urls.get(1)! },
    ];
    // Host a hears of epoch 3 first: its rank 0 dials rank 1, which b holds until it gets there.
    a.mesh.reform(3, [0, 1], urls);
    await new Promise((r) => setTimeout(r, 100));
    expect(b.events.linked).toEqual([]);
    b.mesh.reform(3, [0, 1], urls);
    await until(() => a.events.linked.length === 1 && b.events.linked.length === 1, "both linked in epoch 3");
    expect([a.events.linked[0], b.events.linked[0]]).toEqual([
      [0, 3, 2],
      [1, 3, 2],
    ]);
  });

  it("does not hold a hello for an epoch that never comes for ever", async () => {
    const b = await host([1], [], 200);
    const early = await connectRingPeer(b.urls.get(1)!.url, other.hello(0, 1, 9), { expectKey: b.urls.get(1)!.key });
    const closed = await new Promise<{ code: number; reason: string }>((resolve) => early.onClose((code, reason) => resolve({ code, reason })));
    expect(closed).toEqual({ code: CLOSE_REFORM, reason: "ring epoch 9 never came" });
  });

  it("a rank whose worker died leaves until a ring names it again, and is not counted as left out", async () => {
    const { mesh, events } = await host([0, 1], [0, 1]);
    mesh.start();
    await until(() => events.linked.length === 2, "linked");
    mesh.leave(1, "worker died");
    expect(mesh.inRing(1)).toBe(false);
    // Its neighbour's links broke: a loss of rank 0's ring, told once for the epoch.
    await until(() => events.lost.length > 0, "rank 0 noticing the loss");
    expect(events.lost.every(([rank, epoch]) => rank === 0 && epoch === 0)).toBe(true);
    expect(mesh.reform(1, [0], [])).toEqual([]);
    await until(() => events.linked.some(([rank, epoch]) => rank === 0 && epoch === 1), "rank 0 alone in epoch 1");
    mesh.reform(2, [0, 1], []);
    await until(() => events.linked.filter(([, epoch]) => epoch === 2).length === 2, "both back in epoch 2");
  });
});
