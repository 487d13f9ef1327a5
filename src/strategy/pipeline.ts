import { expectedFrameBytesPerNode } from "../collective/ring.js";
import type { GroupSpec } from "../collective/groups.js";
import type { JobConfig } from "../config/schema.js";
import type { CoordinatorOrder, PipelineReport } from "../protocol/workerOps.js";
import { equalShares } from "../schedule/shares.js";
import { SyncStrategy, workerFigures, type SyncOptions, type SyncPlan, type SyncResult } from "./sync.js";
import type { MembersChange, PlanOptions, RoundReport } from "./types.js";

/** Where each rank sits in the grid: its stage, and the chains (data-parallel replicas of the pipeline). */
export interface PipelineLayout {
  stages: number;
  /** Stage of every rank the job has had. */
  stageOf: readonly number[];
  /** chains[d][s]: the rank that holds stage s for chain d at the start. */
  chains: readonly (readonly number[])[];
}

export interface PipelinePlan extends SyncPlan {
  /** chains[d][s]: who serves stage s for chain d this round (after faults, another replica of s). */
  chains: number[][];
  /** Samples of each chain. */
  chainShares: number[];
}

/** One stage worker's figures of a step, for the live view and metrics. */
export interface StageFigures {
  rank: number;
  stage: number;
  chains: number[];
  compute_ms: number;
  send_ms: number;
  recv_ms: number;
  bubble_ms: number;
  peak_saved_bytes: number;
  act_bytes_sent: number;
  /** Resident memory at the end of the step (null: the worker did not say). */
  rss_bytes: number | null;
}

export interface PipelineResult extends SyncResult {
  stages: StageFigures[];
  /** Every worker's timeline of the step ([F|B, chain, micro-batch, start, end] by rank), for the report. */
  timelines: { rank: number; stage: number; timeline: PipelineReport["timeline"] }[];
}

export class StageLostError extends Error {
  constructor(readonly stage: number) {
    super(`stage ${stage} has no worker left that holds it`);
    this.name = "StageLostError";
  }
}

/**
 * Who serves each stage of each chain when only `members` are left: a chain's own holder
 * while it is a member, otherwise the replica of that stage serving the fewest chains
 * (SWARM's rerouting, here only after a fault). Pure; throws StageLostError when a stage
 * has no member left.
 */
export function routeChains(layout: PipelineLayout, members: readonly number[], allowLost = false): number[][] {
  const alive = new Set(members);
  const load = new Map<number, number>();
  const routes = layout.chains.map((chain) => chain.map((rank) => (alive.has(rank) ? rank : -1)));
  for (const chain of routes) for (const r of chain) if (r >= 0) load.set(r, (load.get(r) ?? 0) + 1);
  for (const chain of routes) {
    chain.forEach((rank, s) => {
      if (rank >= 0) return;
      const holders = members.filter((r) => layout.stageOf[r] === s).sort((a, b) => (load.get(a) ?? 0) - (load.get(b) ?? 0) || a - b);
      if (holders.length === 0) {
        if (allowLost) return; // stays -1: the stage waits for a replacement
        throw new StageLostError(s);
      }
      chain[s] = holders[0];
      load.set(holders[0], (load.get(holders[0]) ?? 0) + 1);
    });
  }
  return routes;
}

/** Stages no member holds. */
export function lostStages(layout: PipelineLayout, members: readonly number[]): number[] {
  return Array.from({ length: layout.stages }, (_, s) => s).filter((s) => !members.some((r) => layout.stageOf[r] === s));
}

/**
 * Where each sole-held stage's state is mirrored at a checkpoint boundary: to the worker of
 * the next stage in chain 0 (the last stage's to the first's), which is a pipe neighbour.
 */
export function mirrorTargets(layout: PipelineLayout, members: readonly number[], routes: readonly (readonly number[])[]): { stage: number; holder: number; keeper: number }[] {
  if (layout.stages < 2) return [];
  const out: { stage: number; holder: number; keeper: number }[] = [];
  for (let s = 0; s < layout.stages; s++) {
    const holders = members.filter((r) => layout.stageOf[r] === s);
    const keeper = routes[0][(s + 1) % layout.stages];
    if (holders.length === 1 && keeper >= 0) out.push({ stage: s, holder: holders[0], keeper });
  }
  return out;
}

/** The groups of links `routes` need beside the ring: a ring per stage with replicas, a pipe per consecutive pair. */
export function pipelineGroups(layout: PipelineLayout, members: readonly number[], routes: readonly (readonly number[])[]): GroupSpec[] {
  const groups: GroupSpec[] = [];
  for (let s = 0; s < layout.stages; s++) {
    const holders = members.filter((r) => layout.stageOf[r] === s).sort((a, b) => a - b);
    if (holders.length > 1) groups.push({ id: `stage:${s}`, kind: "ring", members: holders });
  }
  const pipes = new Set<string>();
  const pipe = (a: number, b: number) => {
    if (a < 0 || b < 0 || a === b || pipes.has(`${a}:${b}`) || pipes.has(`${b}:${a}`)) return;
    pipes.add(`${a}:${b}`);
    groups.push({ id: `pipe:${a}:${b}`, kind: "pipe", members: [a, b] });
  };
  for (const chain of routes) for (let s = 0; s + 1 < chain.length; s++) pipe(chain[s], chain[s + 1]);
  // A sole holder's state goes to its keeper at each checkpoint (the last stage's to the first's: no pipe otherwise).
  for (const m of mirrorTargets(layout, members, routes)) pipe(m.holder, m.keeper);
  return groups;
}

/** Bytes per value of each activation codec, against float32's 4 (what an uncompressed send would be). */
const ACTIVATION_RATIO: Record<string, number> = { none: 1, fp16: 2, bf16: 2, int8: (4 * 256) / (256 + 4) };

/**
 * Pipeline parallelism: every round is one optimizer step of the global batch, split among
 * the chains (equal shares) and, within a chain, into micro-batches that flow through the
 * stages. Each stage's replicas all-reduce that stage's gradient; the workers' reports are
 * folded per stage. Extends sync for the figures and the step loop it shares.
 */
export class PipelineStrategy extends SyncStrategy {
  override readonly name = "pipeline";
  readonly layout: PipelineLayout;
  #routes: number[][];
  #members: number[];
  readonly #batch: number;
  readonly #codec: string;

  constructor(members: readonly number[], opts: SyncOptions, layout: PipelineLayout, parallel: NonNullable<JobConfig["parallel"]>) {
    super(members, { ...opts, balance: "equal" });
    this.layout = layout;
    this.#members = [...members];
    this.#routes = routeChains(layout, members);
    this.#batch = opts.batchSize;
    this.#codec = parallel.activation_codec;
  }

  /** Who serves what now. */
  get routes(): number[][] {
    return this.#routes.map((c) => [...c]);
  }

  /** Samples of each chain (equal: a chain is as fast as its slowest stage, and chains are alike by construction). */
  get chainShares(): number[] {
    return equalShares(this.#batch, this.#routes.length);
  }

  override get shares(): number[] {
    // What each member processes (the samples of the chains it serves), in ring order.
    const per = new Map<number, number>();
    const shares = this.chainShares;
    this.#routes.forEach((chain, d) => {
      const first = chain[0];
      per.set(first, (per.get(first) ?? 0) + shares[d]);
    });
    return this.#members.map((r) => per.get(r) ?? 0);
  }

  override get rates(): null {
    return null;
  }

  /** The groups the ring needs with `members` (for the `ring` message of a re-forming epoch). */
  override groupsFor(members: readonly number[]): GroupSpec[] {
    // A lost stage that a keeper mirrored waits for its replacement: the others' links form meanwhile.
    const waiting = lostStages(this.layout, members).every((s) => this.canReplace(s, members));
    return pipelineGroups(this.layout, members, routeChains(this.layout, members, waiting));
  }

  /** Sole-held stages' states, kept by a peer's provider since the last checkpoint: by stage. */
  readonly mirrors = new Map<number, { keeper: number; tag: string; step: number }>();

  /** A stage lost with its only holder can be taken over: its state was mirrored to a member. */
  canReplace(stage: number, members: readonly number[]): boolean {
    const m = this.mirrors.get(stage);
    return !!m && members.includes(m.keeper);
  }

  /** Stages no member holds now. */
  lost(members: readonly number[]): number[] {
    return lostStages(this.layout, members);
  }

  /** Where the sole-held stages mirror to at this checkpoint. */
  mirrorTargets(): { stage: number; holder: number; keeper: number }[] {
    return mirrorTargets(this.layout, this.#members, this.#routes);
  }

  /**
   * A joiner takes its stage's state from a current holder of that stage, over the stage's
   * ring (its other holders join the collective). A stage with no holder but joiners is lost.
   */
  override handovers(members: readonly number[], joined: readonly number[]): { source: number; members: number[] }[] {
    const stages = [...new Set(joined.map((r) => this.layout.stageOf[r]))].sort((a, b) => a - b);
    // A stage with no holder but joiners is taken over from its mirror (replaceFromMirror), not handed over.
    return stages.flatMap((s) => {
      const holders = members.filter((r) => this.layout.stageOf[r] === s);
      const source = holders.find((r) => !joined.includes(r));
      if (source === undefined) {
        if (this.canReplace(s, members)) return [];
        throw new StageLostError(s);
      }
      return [{ source, members: holders }];
    });
  }

  /** Ranks whose replicas must hold the same parameters: the holders of each stage. */
  override hashGroup(rank: number): number {
    return this.layout.stageOf[rank] ?? 0;
  }

  override plan(round: number, members: readonly number[], worldSize: number, opts: PlanOptions): PipelinePlan {
    if (members.join() !== this.#members.join()) throw new Error(`pipeline: planned for ranks ${members.join(", ")}, routing ${this.#members.join(", ")}`);
    const shares = new Array<number>(worldSize).fill(0);
    this.shares.forEach((share, k) => (shares[members[k]] = share));
    return { round, members: [...members], wantHash: opts.wantHash, shares, chains: this.routes, chainShares: this.chainShares };
  }

  override order(plan: SyncPlan): CoordinatorOrder {
    const p = plan as PipelinePlan;
    return { op: "pipe_step", step: p.round, chains: p.chains, shares: p.chainShares, want_hash: p.wantHash };
  }

  override fold(plan: SyncPlan, reports: ReadonlyMap<number, RoundReport>): PipelineResult {
    const p = plan as PipelinePlan;
    const got = p.members.map((rank) => {
      const rep = reports.get(rank);
      if (!rep) throw new Error(`pipeline: no report of step ${p.round} from rank ${rank}`);
      if (!rep.pipeline) throw new Error(`pipeline: rank ${rank}'s report of step ${p.round} has no pipeline figures`);
      return rep as RoundReport & { pipeline: PipelineReport };
    });
    const first = got[0];
    const nonfinite: string[] = [];
    got.forEach((rep, k) => {
      if (rep.skipped !== first.skipped) {
        throw new Error(`Stages disagree about skipping step ${p.round}: rank ${p.members[0]} ${first.skipped ? "skipped" : "applied"} it, rank ${p.members[k]} did not`);
      }
      if (rep.pipeline.stage !== this.layout.stageOf[p.members[k]]) {
        throw new Error(`pipeline: rank ${p.members[k]} reports stage ${rep.pipeline.stage}, it holds stage ${this.layout.stageOf[p.members[k]]}`);
      }
      for (const name of rep.nonfinite ?? []) nonfinite.push(`${name} (rank ${p.members[k]})`);
    });
    // Every worker reports the step's global loss (one all-reduce of the last stages' sums).
    const last = got.find((rep) => rep.pipeline.stage === this.layout.stages - 1) ?? first;
    const uncompressed = got.map((rep, k) => {
      const holders = p.members.filter((r) => this.layout.stageOf[r] === rep.pipeline.stage);
      const grads = holders.length > 1 && rep.dense_count > 0 ? expectedFrameBytesPerNode(rep.dense_count, holders.length, holders.indexOf(p.members[k]), "f32") : 0;
      return grads + rep.pipeline.act_bytes_sent * (ACTIVATION_RATIO[this.#codec] ?? 1);
    });
    const workers = workerFigures(p.members, got, uncompressed);
    const ms = (s: number) => Math.round(s * 1e4) / 10;
    return {
      round: p.round,
      skipped: first.skipped,
      loss: last.loss,
      samples: this.#batch,
      lr: last.lr,
      bytesSent: got.reduce((sum, rep) => sum + rep.bytes_sent, 0),
      uncompressedBytes: Math.round(uncompressed.reduce((a, b) => a + b, 0)),
      nonfinite,
      workers,
      sharesChanged: null,
      stages: got.map((rep, k) => ({
        rank: p.members[k],
        stage: rep.pipeline.stage,
        chains: rep.pipeline.chains,
        compute_ms: ms(rep.pipeline.compute_s),
        send_ms: ms(rep.pipeline.send_s),
        recv_ms: ms(rep.pipeline.recv_s),
        bubble_ms: ms(rep.pipeline.bubble_s),
        peak_saved_bytes: rep.pipeline.peak_saved_bytes,
        act_bytes_sent: rep.pipeline.act_bytes_sent,
        rss_bytes: rep.pipeline.rss_bytes ?? null,
      })),
      timelines: got.map((rep, k) => ({ rank: p.members[k], stage: rep.pipeline.stage, timeline: rep.pipeline.timeline })),
    };
  }

  /** Members changed: chains of a lost worker are rerouted through another replica of its stage. */
  override membersChanged(change: MembersChange): void {
    this.#members = [...change.members];
    this.#routes = routeChains(this.layout, change.members, true);
  }

  /** Leaving a worker out would lose its chain's share of a stage: never under pipeline. */
  override leaveOut(): [] {
    return [];
  }
}
