import { errorMessage } from "../errors.js";
import { watchHeartbeat } from "../net/heartbeat.js";
import { connectRingPeer, type FrameLink, type LinkOptions, type RingHello } from "../net/link.js";
import { RingAllReduce } from "./ring.js";

/** Close code for a ring link dropped because the ring re-forms: not a fault. */
export const CLOSE_REFORM = 4006;
/** How long a ring neighbour may take to connect once the ring (re)forms; and the longest a hello for a later epoch is held. */
export const RING_CONNECT_TIMEOUT_MS = 60_000;

/** An admitted incoming ring connection: its hello's ranks and epoch. */
export interface IncomingLink {
  from: number;
  to: number;
  epoch: number;
  link: FrameLink;
}

/** What a mesh makes of a member's two links: a ring all-reduce (the default) or a pipe. */
export interface MeshChannel {
  abort(reason: string): void;
}

/** The member's links once both are up, for the mesh's channel factory. */
export interface ChannelLinks {
  /** The member's rank and its position in the ring of `size`. */
  rank: number;
  position: number;
  size: number;
  prevRank: number;
  nextRank: number;
  next: FrameLink | null;
  prev: FrameLink | null;
}

/** What the mesh tells its owner: a narrow set of callbacks, no owner object. */
export interface MeshEvents<C extends MeshChannel = RingAllReduce> {
  /** Both links of `rank` in `epoch` are up (or it is the only member): its ring, of `size` members. */
  linked(rank: number, epoch: number, ring: C, size: number): void;
  /** A link of `rank` broke in `epoch` (once per rank and epoch). */
  lost(rank: number, epoch: number, reason: string): void;
  /** `rank` cannot reach its successor in time, or the ring is malformed: the job cannot go on. */
  fail(message: string, rank?: number): void;
  log(line: string, level: "debug" | "info" | "warn"): void;
  /** Every link the mesh makes or is handed, for byte counts. */
  track(link: FrameLink): void;
}

/** Where a rank is served, and who serves it. */
export interface RingPeer {
  url: string;
  key: string;
}

export interface MeshOptions {
  /** The ranks this host runs. */
  local: readonly number[];
  /** Ring members at the start, in ring order (none for a host joining a running job). */
  members: readonly number[];
  /** Data-plane URL of every rank the job has had, and the key its host's certificate carries. */
  peers: ReadonlyMap<number, RingPeer>;
  /** What this host presents to its successors on a link's TLS session (its proof and credential). */
  hello: (from: number, to: number, epoch: number, binding: Buffer) => RingHello;
  heartbeatMs: number;
  link?: LinkOptions;
  /** How long a hello for a later epoch waits for that epoch (default RING_CONNECT_TIMEOUT_MS). */
  holdEarlyMs?: number;
}

interface Slot<C> {
  next: FrameLink | null;
  prev: FrameLink | null;
  ring: C | null;
  /** The epoch its ring was last formed in (-1: never since it (re)started). */
  formed: number;
  /** The epoch whose loss it already reported. */
  lostEpoch: number;
  /** Out of the ring until a `reform` names it again (its worker died). */
  out: boolean;
}

/**
 * The data-plane links of one job on one host: forming and re-forming the ring by epoch.
 * Each local member connects to its successor and is connected to by its predecessor;
 * a hello for an epoch not reached yet is held until `reform` reaches it, one for an older
 * epoch is closed with CLOSE_REFORM.
 */
export class Mesh<C extends MeshChannel = RingAllReduce> {
  #members: number[];
  #epoch = 0;
  #closed = false;
  readonly #peers: Map<number, RingPeer>;
  readonly #slots = new Map<number, Slot<C>>();
  readonly #channel: (links: ChannelLinks) => C;
  #early: IncomingLink[] = [];
  readonly #earlyTimers = new Map<IncomingLink, NodeJS.Timeout>();

  constructor(
    private readonly opts: MeshOptions,
    private readonly events: MeshEvents<C>,
    /** What a member's links become (default: a RingAllReduce). */
    channel?: (links: ChannelLinks) => C,
  ) {
    this.#channel = channel ?? ((l) => new RingAllReduce({ rank: l.position, size: l.size, next: l.next, prev: l.prev }) as unknown as C);
    this.#members = [...opts.members];
    this.#peers = new Map(opts.peers);
    for (const rank of opts.local) this.#slots.set(rank, { next: null, prev: null, ring: null, formed: -1, lostEpoch: -1, out: false });
  }

  get epoch(): number {
    return this.#epoch;
  }

  get members(): readonly number[] {
    return this.#members;
  }

  /** A member of the current ring, not out of it. */
  inRing(rank: number): boolean {
    const slot = this.#slots.get(rank);
    return !!slot && !slot.out && this.#members.includes(rank);
  }

  ringOf(rank: number): C | null {
    return this.#slots.get(rank)?.ring ?? null;
  }

  /** Linked into the current epoch's ring. */
  isLinked(rank: number): boolean {
    const slot = this.#slots.get(rank);
    return !!slot && slot.formed === this.#epoch && this.inRing(rank);
  }

  /** Data-plane URL and key of a rank's host, if the job named one. */
  peerOf(rank: number): RingPeer | undefined {
    return this.#peers.get(rank);
  }

  /** The members before and after `rank` in the current ring, and its position. */
  neighbours(rank: number): { prev: number; next: number; position: number } {
    const n = this.#members.length;
    const position = this.#members.indexOf(rank);
    return { position, prev: this.#members[(position - 1 + n) % n], next: this.#members[(position + 1) % n] };
  }

  /** Connect every local member of the starting ring. */
  start(): void {
    for (const rank of this.opts.local) this.#form(rank);
  }

  /**
   * Re-form the ring with `members` in a new `epoch` (between rounds). Old links close with
   * CLOSE_REFORM. Returns the local ranks that were in a ring and are not named now (left
   * out); ranks out because their worker died wait for a later ring.
   */
  reform(epoch: number, members: readonly number[], peers: readonly ({ rank: number } & RingPeer)[]): number[] {
    for (const p of peers) this.#peers.set(p.rank, { url: p.url, key: p.key });
    if (epoch <= this.#epoch) throw new Error(`ring epoch ${epoch} is not after ${this.#epoch}`);
    if (new Set(members).size !== members.length || !members.every((r) => this.#peers.has(r))) {
      throw new Error(`ring members ${members.join(", ")} are not distinct ranks with known addresses`);
    }
    this.#epoch = epoch;
    this.#members = [...members];
    const leftOut: number[] = [];
    for (const [rank, slot] of this.#slots) {
      this.#unlink(slot, "ring re-formed");
      if (members.includes(rank)) slot.out = false;
      else if (!slot.out && slot.formed >= 0) leftOut.push(rank);
    }
    for (const rank of this.opts.local) this.#form(rank);
    const held = this.#early;
    this.#early = [];
    for (const hello of held) {
      clearTimeout(this.#earlyTimers.get(hello));
      this.#earlyTimers.delete(hello);
      this.accept(hello);
    }
    return leftOut;
  }

  /** A rank's worker died: it leaves the ring until a `reform` names it again. */
  leave(rank: number, reason: string): void {
    const slot = this.#slots.get(rank);
    if (!slot) return;
    slot.out = true;
    slot.formed = -1;
    slot.ring?.abort(reason);
    this.#unlink(slot, "rank left");
  }

  /** End the collectives in flight of every local member (an attempt abandoned). */
  abortRounds(reason: string): void {
    for (const slot of this.#slots.values()) slot.ring?.abort(reason);
  }

  /** An admitted incoming link: attached now, held for a later epoch, or closed as stale. */
  accept(hello: IncomingLink): void {
    const { from, to, epoch, link } = hello;
    this.events.track(link);
    if (this.#closed || epoch < this.#epoch) {
      link.close(CLOSE_REFORM, "ring re-formed");
      return;
    }
    if (epoch > this.#epoch) {
      // The neighbour heard of the new ring before we did: hold the link until we do, but
      // not for ever (a hello for an epoch that never comes is closed).
      this.#early.push(hello);
      const timer = setTimeout(() => link.close(CLOSE_REFORM, `ring epoch ${epoch} never came`), this.opts.holdEarlyMs ?? RING_CONNECT_TIMEOUT_MS);
      link.onClose(() => {
        clearTimeout(timer);
        this.#early = this.#early.filter((e) => e !== hello);
      });
      this.#earlyTimers.set(hello, timer);
      return;
    }
    const slot = this.#slots.get(to);
    if (!slot || !this.inRing(to) || from !== this.neighbours(to).prev || slot.prev) {
      link.close(4002, "unexpected ring peer");
      return;
    }
    slot.prev = link;
    this.#watch(link);
    link.onClose((code, reason) => {
      if (this.#closed || slot.prev !== link) return;
      if (code === CLOSE_REFORM) slot.prev = null;
      else this.#lost(to, `lost the ring link into rank ${to} from rank ${from}: ${describeClose(code, reason)}`);
    });
    this.#maybeLinked(to);
  }

  close(reason: string): void {
    this.#closed = true;
    for (const slot of this.#slots.values()) {
      slot.ring?.abort(reason);
      slot.next?.close(1000, "job ended");
      slot.prev?.close(1000, "job ended");
    }
    for (const e of this.#early) e.link.close(1000, "job ended");
  }

  #unlink(slot: Slot<C>, why: string) {
    slot.ring = null;
    for (const link of [slot.next, slot.prev]) link?.close(CLOSE_REFORM, why);
    slot.next = slot.prev = null;
  }

  #form(rank: number) {
    if (!this.inRing(rank)) return;
    if (this.#members.length > 1) void this.#connectNext(rank);
    else this.#maybeLinked(rank);
  }

  #maybeLinked(rank: number) {
    const slot = this.#slots.get(rank)!;
    if (!this.inRing(rank) || slot.formed === this.#epoch) return;
    const size = this.#members.length;
    if (size > 1 && (!slot.next || !slot.prev)) return;
    const { position, prev, next } = this.neighbours(rank);
    slot.ring = this.#channel({ rank, position, size, prevRank: prev, nextRank: next, next: slot.next, prev: slot.prev });
    slot.formed = this.#epoch;
    this.events.linked(rank, this.#epoch, slot.ring, size);
  }

  #lost(rank: number, reason: string) {
    const slot = this.#slots.get(rank)!;
    if (slot.out || slot.lostEpoch === this.#epoch) return;
    slot.lostEpoch = this.#epoch;
    this.events.lost(rank, this.#epoch, reason);
  }

  /** A ring neighbour silent past the heartbeat deadline is cut off: its link closes (1006). */
  #watch(link: FrameLink) {
    watchHeartbeat(link.ws, {
      timeoutMs: this.opts.heartbeatMs,
      onDead: (silent) => this.events.log(`ring neighbour silent for ${(silent / 1000).toFixed(1)} s: dropping its link`, "warn"),
    });
  }

  async #connectNext(rank: number) {
    const epoch = this.#epoch;
    const slot = this.#slots.get(rank)!;
    const nextRank = this.neighbours(rank).next;
    const peer = this.#peers.get(nextRank);
    if (!peer) return this.events.fail(`the job names no address for rank ${nextRank}`, rank);
    const { url } = peer;
    const stale = () => this.#closed || slot.out || this.#epoch !== epoch;
    const deadline = Date.now() + RING_CONNECT_TIMEOUT_MS;
    for (let attempt = 0; ; attempt++) {
      try {
        const link = await connectRingPeer(url, (binding) => this.opts.hello(rank, nextRank, epoch, binding), { ...this.opts.link, expectKey: peer.key });
        this.events.track(link);
        if (stale()) return link.close(CLOSE_REFORM, "ring re-formed");
        slot.next = link;
        this.events.log(`ring link from rank ${rank} to rank ${nextRank} connected (epoch ${epoch})`, "debug");
        this.#watch(link);
        link.onClose((code, reason) => {
          if (this.#closed || slot.next !== link) return;
          // The neighbour re-formed first: our own `ring` message is on its way.
          if (code === CLOSE_REFORM) slot.next = null;
          else this.#lost(rank, `lost the ring link from rank ${rank} to rank ${nextRank} (${url}): ${describeClose(code, reason)}`);
        });
        return this.#maybeLinked(rank);
      } catch (err) {
        if (stale()) return;
        if (Date.now() > deadline) return this.events.fail(`rank ${rank} cannot reach rank ${nextRank} at ${url}: ${errorMessage(err)}`, rank);
        await new Promise((r) => setTimeout(r, Math.min(2000, 100 * 2 ** attempt)));
      }
    }
  }
}

function describeClose(code: number, reason: string): string {
  return `code ${code}${reason ? ` (${reason})` : ""}`;
}
