import type { FrameLink } from "../net/link.js";
import { DirectAllReduce } from "./direct.js";
import { type GroupEvents, GroupMeshes, type GroupOptions, type HostGroupSpec } from "./groups.js";
import type { IncomingLink, RingPeer } from "./mesh.js";

/** Group ids of the direct all-reduce's pairs start with this (`direct:A:B`, A < B). */
export const DIRECT_GROUP_PREFIX = "direct:";

/** Whether a hello's group is one of the direct all-reduce's pairs. */
export function isDirectGroup(group: string | undefined): boolean {
  return group !== undefined && group.startsWith(DIRECT_GROUP_PREFIX);
}

/** Every pair of `members`, as pair groups (none below `minMembers` or above `maxMembers`). */
export function pairSpecs(members: readonly number[], minMembers = 2, maxMembers = Infinity): HostGroupSpec[] {
  if (members.length < Math.max(2, minMembers) || members.length > maxMembers) return [];
  const out: HostGroupSpec[] = [];
  for (let i = 0; i < members.length; i++) {
    for (let j = i + 1; j < members.length; j++) {
      const [a, b] = members[i] < members[j] ? [members[i], members[j]] : [members[j], members[i]];
      out.push({ id: `${DIRECT_GROUP_PREFIX}${a}:${b}`, kind: "pair", members: [a, b] });
    }
  }
  return out;
}

export interface DirectMeshOptions extends GroupOptions {
  /** Ring members at the start, in ring order (positions); none for a host joining a running job. */
  members: readonly number[];
  /** Pairs are linked only while the ring has at least this many members (2 or more)... */
  minMembers: number;
  /** ...and at most this many (default: any). */
  maxMembers?: number;
}

/**
 * The links of the direct all-reduce on one host: a one-way link from each local rank to
 * every other member and back (pair groups, each its own mesh, re-formed by epoch with the
 * ring), and, once all of a rank's pairs are up in an epoch, its DirectAllReduce (made at
 * once, so that frames of a peer that started first are consumed as they come).
 */
export class DirectMeshes {
  readonly #groups: GroupMeshes;
  readonly #local: readonly number[];
  readonly #minMembers: number;
  readonly #maxMembers: number;
  #members: number[];
  #epoch = 0;
  readonly #reducers = new Map<number, { epoch: number; reducer: DirectAllReduce }>();

  constructor(opts: DirectMeshOptions, private readonly events: GroupEvents) {
    this.#local = opts.local;
    this.#minMembers = Math.max(2, opts.minMembers);
    this.#maxMembers = opts.maxMembers ?? Infinity;
    this.#members = [...opts.members];
    this.#groups = new GroupMeshes(
      opts,
      {
        ...events,
        linked: (rank, epoch) => {
          this.#maybeBuild(rank);
          events.linked(rank, epoch);
        },
      },
      pairSpecs(this.#members, this.#minMembers, this.#maxMembers),
    );
  }

  start(): void {
    this.#groups.start();
    for (const rank of this.#local) this.#maybeBuild(rank);
  }

  /** Every pair of `rank` is linked in this epoch (true when it has none). */
  allLinked(rank: number): boolean {
    return this.#groups.allLinked(rank);
  }

  /** The rank's direct all-reduce of this epoch (null: not all its pairs are up, or too few members). */
  reducerOf(rank: number): DirectAllReduce | null {
    const r = this.#reducers.get(rank);
    return r && r.epoch === this.#epoch && !r.reducer.error ? r.reducer : null;
  }

  accept(hello: IncomingLink & { group: string }): void {
    this.#groups.accept(hello);
  }

  reform(epoch: number, members: readonly number[], peers: readonly ({ rank: number } & RingPeer)[]): void {
    // The old epoch's all-reduces die with their links, which the pairs' re-forming closes (CLOSE_REFORM).
    this.#reducers.clear();
    this.#epoch = epoch;
    this.#members = [...members];
    this.#groups.reform(epoch, pairSpecs(members, this.#minMembers, this.#maxMembers), peers);
    for (const rank of this.#local) this.#maybeBuild(rank);
  }

  /** End the all-reduces in flight (an attempt abandoned): they fail, and their links close. */
  abortRounds(reason: string): void {
    for (const { reducer } of this.#reducers.values()) reducer.abort(reason);
    this.#groups.abortRounds(reason);
  }

  leave(rank: number, reason: string): void {
    this.#reducers.get(rank)?.reducer.abort(reason);
    this.#reducers.delete(rank);
    this.#groups.leave(rank, reason);
  }

  close(reason: string): void {
    for (const { reducer } of this.#reducers.values()) reducer.close();
    this.#reducers.clear();
    this.#groups.close(reason);
  }

  #maybeBuild(rank: number): void {
    const position = this.#members.indexOf(rank);
    if (position < 0 || this.#members.length < this.#minMembers || this.#members.length > this.#maxMembers) return;
    const have = this.#reducers.get(rank);
    if (have && have.epoch === this.#epoch) return;
    const peers: { position: number; rank: number; send: FrameLink; recv: FrameLink }[] = [];
    for (let q = 0; q < this.#members.length; q++) {
      if (q === position) continue;
      const pair = this.#groups.pair(rank, this.#members[q]);
      if (!pair?.next || !pair.prev) return;
      peers.push({ position: q, rank: this.#members[q], send: pair.next, recv: pair.prev });
    }
    this.#reducers.set(rank, { epoch: this.#epoch, reducer: new DirectAllReduce({ position, size: this.#members.length, peers }) });
    this.events.log(`direct all-reduce links of rank ${rank} up (epoch ${this.#epoch}, ${peers.length} peers)`, "debug");
  }
}
