import { CLOSE_ABORTED, type FrameLink, type LinkOptions, type RingHello } from "../net/link.js";
import { CLOSE_REFORM, Mesh, RING_CONNECT_TIMEOUT_MS, type IncomingLink, type RingPeer } from "./mesh.js";
import { PipeChannel } from "./pipe.js";
import { RingAllReduce } from "./ring.js";

/**
 * A group of ranks with links of its own, beside the job's ring (pipeline parallelism):
 * a stage's replicas all-reducing that stage's gradient (`ring`, id `stage:S`), or two
 * consecutive stages' workers exchanging activations and their gradients (`pipe`, id
 * `pipe:A:B`, members [A, B]). The coordinator names them; they re-form with the ring.
 * A `pair` (id `direct:A:B`, members [A, B]) is just the two one-way links between two
 * ranks, for the direct all-reduce (src/collective/directMesh.ts derives them from the
 * ring's members: every pair of them).
 */
export interface GroupSpec {
  id: string;
  kind: "ring" | "pipe";
  members: number[];
}

/** What a host's GroupMeshes holds: the coordinator's groups, or pairs it derives itself (never on the wire). */
export interface HostGroupSpec extends Omit<GroupSpec, "kind"> {
  kind: GroupSpec["kind"] | "pair";
}

/** A pair group's links, as its mesh hands them over: to the other rank (`next`) and from it (`prev`). */
export class PairLinks {
  constructor(
    readonly rank: number,
    readonly peer: number,
    readonly next: FrameLink | null,
    readonly prev: FrameLink | null,
  ) {}

  /** Close both links (what uses them fails, naming the peer). */
  abort(reason: string): void {
    this.next?.close(CLOSE_ABORTED, reason);
    this.prev?.close(CLOSE_ABORTED, reason);
  }
}

export interface GroupEvents {
  /** A group's links of `rank` are up in `epoch`. */
  linked(rank: number, epoch: number): void;
  lost(rank: number, epoch: number, reason: string): void;
  fail(message: string, rank?: number): void;
  log(line: string, level: "debug" | "info" | "warn"): void;
  track(link: FrameLink): void;
}

export interface GroupOptions {
  local: readonly number[];
  peers: ReadonlyMap<number, RingPeer>;
  hello: (group: string, from: number, to: number, epoch: number, binding: Buffer) => RingHello;
  heartbeatMs: number;
  link?: LinkOptions;
}

type Channel = RingAllReduce | PipeChannel | PairLinks;

interface Group {
  spec: HostGroupSpec;
  mesh: Mesh<Channel>;
}

/** The groups of one job on one host that hold a local rank: one mesh each, re-formed by epoch. */
export class GroupMeshes {
  #epoch = 0;
  #closed = false;
  readonly #groups = new Map<string, Group>();
  readonly #peers: Map<number, RingPeer>;
  /** Hellos for a group this host has not heard of yet (a later epoch's), held a while. */
  #early: { hello: IncomingLink & { group: string }; timer: NodeJS.Timeout }[] = [];

  constructor(
    private readonly opts: GroupOptions,
    private readonly events: GroupEvents,
    /** The groups of the first epoch (none for a host joining a running job: its `ring` names them). */
    initial: readonly HostGroupSpec[] = [],
  ) {
    this.#peers = new Map(opts.peers);
    // Made now, so that a peer's hello arriving before `start` finds its group.
    for (const spec of this.#mine(initial)) this.#make(spec, spec.members);
  }

  /** Connect the first epoch's links. */
  start(): void {
    for (const g of this.#groups.values()) g.mesh.start();
  }

  /** Every group holding `rank` is linked in the current epoch (true when it is in none). */
  allLinked(rank: number): boolean {
    for (const g of this.#groups.values()) if (g.spec.members.includes(rank) && !g.mesh.isLinked(rank)) return false;
    return true;
  }

  /** The ring of `rank`'s stage replicas (null: none, i.e. it holds its stage alone, or not linked). */
  stageRing(rank: number): RingAllReduce | null {
    for (const g of this.#groups.values()) {
      if (g.spec.kind === "ring" && g.spec.id.startsWith("stage:") && g.spec.members.includes(rank)) return g.mesh.ringOf(rank) as RingAllReduce | null;
    }
    return null;
  }

  /** Whether `rank` is in a stage ring at all (a lone holder is not). */
  hasStageRing(rank: number): boolean {
    return [...this.#groups.values()].some((g) => g.spec.kind === "ring" && g.spec.id.startsWith("stage:") && g.spec.members.includes(rank));
  }

  /** The pipe between `rank` and `peer`, either way round. */
  pipe(rank: number, peer: number): PipeChannel | null {
    for (const g of this.#groups.values()) {
      const m = g.spec.members;
      if (g.spec.kind === "pipe" && m.includes(rank) && m.includes(peer)) return g.mesh.ringOf(rank) as PipeChannel | null;
    }
    return null;
  }

  /** The links between `rank` and `peer` of their pair group (null: none, or not linked in this epoch). */
  pair(rank: number, peer: number): PairLinks | null {
    for (const g of this.#groups.values()) {
      const m = g.spec.members;
      if (g.spec.kind === "pair" && m.includes(rank) && m.includes(peer)) return g.mesh.isLinked(rank) ? (g.mesh.ringOf(rank) as PairLinks | null) : null;
    }
    return null;
  }

  /** A new epoch: groups gone are closed, the others re-form with their members now. */
  reform(epoch: number, specs: readonly HostGroupSpec[], peers: readonly ({ rank: number } & RingPeer)[]): void {
    if (epoch <= this.#epoch) throw new Error(`group epoch ${epoch} is not after ${this.#epoch}`);
    this.#epoch = epoch;
    for (const p of peers) this.#peers.set(p.rank, { url: p.url, key: p.key });
    const wanted = new Map(this.#mine(specs).map((s) => [s.id, s]));
    for (const [id, g] of this.#groups) {
      if (!wanted.has(id)) {
        g.mesh.close("group re-formed without it");
        this.#groups.delete(id);
      }
    }
    for (const spec of wanted.values()) {
      const g = this.#groups.get(spec.id) ?? this.#make(spec, []);
      g.spec = spec;
      g.mesh.reform(epoch, spec.members, [...this.#peers].map(([rank, p]) => ({ rank, ...p })));
    }
    const held = this.#early;
    this.#early = [];
    for (const e of held) {
      clearTimeout(e.timer);
      this.accept(e.hello);
    }
  }

  /** An admitted incoming link of a group. */
  accept(hello: IncomingLink & { group: string }): void {
    const g = this.#groups.get(hello.group);
    if (g && hello.epoch <= this.#epoch) return g.mesh.accept(hello);
    if (this.#closed || hello.epoch <= this.#epoch) {
      hello.link.close(CLOSE_REFORM, "no such group in this epoch");
      return;
    }
    // A peer heard of the next epoch (and its groups) before we did.
    const timer = setTimeout(() => hello.link.close(CLOSE_REFORM, `group ${hello.group} never came`), RING_CONNECT_TIMEOUT_MS);
    const entry = { hello, timer };
    this.#early.push(entry);
    hello.link.onClose(() => {
      clearTimeout(timer);
      this.#early = this.#early.filter((e) => e !== entry);
    });
  }

  /** End every collective and pipe in flight (an attempt abandoned). */
  abortRounds(reason: string): void {
    for (const g of this.#groups.values()) g.mesh.abortRounds(reason);
  }

  /** A local rank's worker died: it leaves its groups until they re-form naming it. */
  leave(rank: number, reason: string): void {
    for (const g of this.#groups.values()) if (g.spec.members.includes(rank)) g.mesh.leave(rank, reason);
  }

  close(reason: string): void {
    this.#closed = true;
    for (const g of this.#groups.values()) g.mesh.close(reason);
    for (const e of this.#early) {
      clearTimeout(e.timer);
      e.hello.link.close(1000, "job ended");
    }
    this.#early = [];
  }

  #mine(specs: readonly HostGroupSpec[]): HostGroupSpec[] {
    return specs.filter((s) => s.members.length > 1 && s.members.some((r) => this.opts.local.includes(r)));
  }

  #make(spec: HostGroupSpec, members: readonly number[]): Group {
    const local = this.opts.local.filter((r) => spec.members.includes(r));
    const id = spec.id;
    const mesh = new Mesh<Channel>(
      {
        local,
        members,
        peers: this.#peers,
        hello: (from, to, epoch, binding) => this.opts.hello(id, from, to, epoch, binding),
        heartbeatMs: this.opts.heartbeatMs,
        link: this.opts.link,
      },
      {
        linked: (rank, epoch) => this.events.linked(rank, epoch),
        lost: (rank, epoch, reason) => this.events.lost(rank, epoch, `${reason} (group ${id})`),
        fail: (message, rank) => this.events.fail(`${message} (group ${id})`, rank),
        log: (line, level) => this.events.log(`${line} (group ${id})`, level),
        track: (link) => this.events.track(link),
      },
      (l) =>
        spec.kind === "pipe"
          ? new PipeChannel({ rank: l.rank, peer: l.nextRank, next: l.next, prev: l.prev })
          : spec.kind === "pair"
            ? new PairLinks(l.rank, l.nextRank, l.next, l.prev)
            : new RingAllReduce({ rank: l.position, size: l.size, next: l.next, prev: l.prev }),
    );
    const group = { spec, mesh };
    this.#groups.set(id, group);
    return group;
  }
}
