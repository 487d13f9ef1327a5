import type { GroupSpec } from "../collective/groups.js";
import { expectedFrameBytesPerNode } from "../collective/ring.js";
import type { JobConfig } from "../config/schema.js";
import type { CoordinatorOrder } from "../protocol/workerOps.js";
import { allocate } from "../schedule/allocate.js";
import { Rebalancer } from "../schedule/rebalance.js";
import { equalShares } from "../schedule/shares.js";
import type { MembersChange, PlanOptions, RoundPlan, RoundReport, RoundResult, Strategy } from "./types.js";

/** Steps measured before deciding whether a worker costs the job more than it adds. */
const LEAVE_OUT_AFTER_STEPS = 3;

export interface SyncPlan extends RoundPlan {
  /** One share per rank the job has had (0 for ranks out of the ring), as workers take them. */
  shares: number[];
}

/** One member's figures of a step (metrics.jsonl's `workers`, less `share`). */
export interface WorkerFigures {
  rank: number;
  samples: number;
  compute_s: number;
  /** Of compute_s, the forward/backward over the share (null from workers that do not say). */
  forward_backward_s: number | null;
  comm_s: number;
  /** Seconds it waited for the slowest member's compute. */
  idle_s: number;
  bytes_sent: number;
  uncompressed_bytes: number;
  micro_batches: number;
  /** null: the whole share at once. */
  max_micro_batch: number | null;
}

export interface SyncResult extends RoundResult {
  /** Non-finite gradients by name and rank, on a skipped step. */
  nonfinite: string[];
  workers: WorkerFigures[];
  /** Set when the measured speeds moved the shares of the next step. */
  sharesChanged: { shares: number[]; rates: number[] } | null;
}

/** Each member's figures of a round from its report: `uncompressed` bytes by member, idle time against the slowest. */
export function workerFigures(members: readonly number[], got: readonly RoundReport[], uncompressed: readonly number[]): WorkerFigures[] {
  const maxCompute = Math.max(...got.map((rep) => rep.compute_s));
  return got.map((rep, k) => ({
    rank: members[k],
    samples: rep.samples,
    compute_s: rep.compute_s,
    forward_backward_s: rep.forward_backward_s ?? null,
    comm_s: rep.comm_s,
    idle_s: maxCompute - rep.compute_s,
    bytes_sent: rep.bytes_sent,
    uncompressed_bytes: Math.round(uncompressed[k]),
    micro_batches: rep.micro_batches,
    max_micro_batch: rep.max_micro_batch,
  }));
}

/** A worker to leave out, and why (with the figures behind it). */
export interface LeaveOut {
  rank: number;
  reason: string;
}

export interface SyncOptions {
  batchSize: number;
  balance: JobConfig["balance"];
  compression: JobConfig["compression"];
  /** Samples/s each rank is thought to do before any step is measured (profiles). */
  initialRates: number[];
}

/**
 * `sync`: every round is one optimizer step of the global batch, split among the members
 * by shares that follow their measured speed (`balance: measured`) or evenly.
 */
export class SyncStrategy implements Strategy<SyncPlan, SyncResult> {
  readonly name: string = "sync";
  /** Steps one round covers. */
  readonly stepsPerRound: number = 1;
  /** The op of the workers' reports of a round. */
  readonly reportOp: "step_done" | "round_done" = "step_done";
  #members: number[];
  #rebalancer: Rebalancer | null;
  readonly #opts: SyncOptions;

  constructor(members: readonly number[], opts: SyncOptions) {
    this.#opts = opts;
    this.#members = [...members];
    const rates = members.map((r) => opts.initialRates[r] ?? 0);
    const initial = rates.every((x) => x > 0) ? rates : members.map(() => 1);
    this.#rebalancer = opts.balance === "measured" ? new Rebalancer(opts.batchSize, initial) : null;
  }

  /** Shares of the members, in ring order. */
  get shares(): number[] {
    return this.#rebalancer ? this.#rebalancer.shares : equalShares(this.#opts.batchSize, this.#members.length);
  }

  /** Measured samples/s of the members (null with `balance: equal`). */
  get rates(): number[] | null {
    return this.#rebalancer ? [...this.#rebalancer.rates] : null;
  }

  /** The step after which slow workers may be left out: once the steps that count are measured. */
  get leaveOutAfter(): number {
    const c = this.#opts.compression;
    const compressedFrom = c.method === "powersgd" || c.method === "topk" ? c.start_step : 0;
    return Math.max(LEAVE_OUT_AFTER_STEPS, compressedFrom + 2) - 1;
  }

  plan(round: number, members: readonly number[], worldSize: number, opts: PlanOptions): SyncPlan {
    if (members.join() !== this.#members.join()) throw new Error(`sync: planned for ranks ${members.join(", ")}, holding shares for ${this.#members.join(", ")}`);
    const shares = new Array<number>(worldSize).fill(0);
    this.shares.forEach((share, k) => (shares[members[k]] = share));
    return { round, members: [...members], wantHash: opts.wantHash, shares };
  }

  /** The order that runs `plan` on its members (the decision to ride on it is added by the run loop). */
  order(plan: SyncPlan): CoordinatorOrder {
    return { op: "step", step: plan.round, shares: plan.shares, want_hash: plan.wantHash };
  }

  fold(plan: SyncPlan, reports: ReadonlyMap<number, RoundReport>): SyncResult {
    const batch = this.#opts.batchSize;
    const got = plan.members.map((rank) => {
      const rep = reports.get(rank);
      if (!rep) throw new Error(`sync: no report of step ${plan.round} from rank ${rank}`);
      return rep;
    });
    const first = got[0];
    const nonfinite: string[] = [];
    let loss = 0;
    got.forEach((rep, k) => {
      if (rep.skipped !== first.skipped) {
        throw new Error(`Replicas disagree about skipping step ${plan.round}: rank ${plan.members[0]} ${first.skipped ? "skipped" : "applied"} it, rank ${plan.members[k]} did not`);
      }
      for (const name of rep.nonfinite ?? []) nonfinite.push(`${name} (rank ${plan.members[k]})`);
      loss += (rep.loss * rep.samples) / batch;
    });
    // What one plain float32 ring all-reduce of the whole gradient would have sent from each.
    const size = plan.members.length;
    const uncompressed = got.map((rep, k) => (size > 1 && rep.dense_count > 0 ? expectedFrameBytesPerNode(rep.dense_count, size, k, "f32") : 0));
    const workers = workerFigures(plan.members, got, uncompressed);
    return {
      round: plan.round,
      skipped: first.skipped,
      loss,
      samples: batch,
      lr: got[got.length - 1].lr,
      bytesSent: got.reduce((sum, rep) => sum + rep.bytes_sent, 0),
      uncompressedBytes: uncompressed.reduce((a, b) => a + b, 0),
      nonfinite,
      workers,
      sharesChanged: this.#observe(got),
    };
  }

  /** Measured speeds move the next step's shares (the rebalancer ignores noise). */
  #observe(got: RoundReport[]): SyncResult["sharesChanged"] {
    if (!this.#rebalancer) return null;
    const before = this.#rebalancer.shares.join(":");
    const shares = this.#rebalancer.observe(
      got.map((rep) => rep.samples),
      got.map((rep) => rep.forward_backward_s ?? rep.compute_s),
    );
    return shares.join(":") === before ? null : { shares: [...shares], rates: [...this.#rebalancer.rates] };
  }

  /**
   * Members changed: those who stay keep their measured speed, newcomers start at the
   * others' mean (the next steps measure them).
   */
  membersChanged(change: MembersChange): void {
    const rates = this.#rebalancer?.rates;
    const rateOf = new Map(this.#members.map((rank, k) => [rank, rates ? rates[k] : 1]));
    const staying = change.members.filter((r) => rateOf.has(r) && !change.joined.includes(r));
    const mean = staying.length ? staying.reduce((a, r) => a + rateOf.get(r)!, 0) / staying.length : 1;
    this.#members = [...change.members];
    if (this.#rebalancer) {
      this.#rebalancer = new Rebalancer(this.#opts.batchSize, this.#members.map((r) => (staying.includes(r) ? rateOf.get(r)! : mean)));
    }
  }

  /**
   * Which members make every step slower than they add, weighing each one's measured speed
   * and upload (`links`, bytes/s by rank) against the step's bytes per worker. Empty: all stay.
   */
  leaveOut(describe: (rank: number) => string, links: ReadonlyMap<number, number>, stepBytesPerWorker: number): LeaveOut[] {
    const rates = this.#rebalancer?.rates;
    if (!rates || this.#members.length < 2) return [];
    const decision = allocate({
      batchSize: this.#opts.batchSize,
      stepBytesPerWorker,
      workers: this.#members.map((rank, k) => ({ id: describe(rank), samplesPerS: rates[k], linkBytesPerS: links.get(rank) })),
    });
    return decision.excluded.map((e) => ({ rank: this.#members[e.index], reason: e.reason }));
  }

  /** Groups of links beside the ring that `members` need (none: sync needs only the ring). */
  groupsFor(_members: readonly number[]): GroupSpec[] | undefined {
    return undefined;
  }

  /**
   * Who hands their state to `joined` and to whom (undefined: one member's state to all of
   * `members` over the ring, as sync does).
   */
  handovers(_members: readonly number[], _joined: readonly number[]): { source: number; members: number[] }[] | undefined {
    return undefined;
  }

  /** Ranks whose parameter hashes must agree share a group (sync: every replica). */
  hashGroup(_rank: number): number {
    return 0;
  }

  state(): null {
    return null;
  }

  load(): void {}
}
