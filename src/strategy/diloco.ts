import type { JobConfig } from "../config/schema.js";
import { expectedFrameBytesPerNode } from "../collective/ring.js";
import type { CoordinatorOrder } from "../protocol/workerOps.js";
import { SyncStrategy, type SyncOptions, type SyncPlan, type SyncResult } from "./sync.js";
import type { MembersChange, PlanOptions, RoundReport } from "./types.js";

export type DilocoConfig = Extract<JobConfig["strategy"], { name: "diloco" }>;

/** A round's plan: inner steps `step` .. `step + steps - 1`, then the sync of one fragment. */
export interface DilocoPlan extends SyncPlan {
  steps: number;
  fragment: number;
}

/** What a DiLoCo worker reports of a round (round_done), as its provider forwards it. */
export type DilocoReport = RoundReport & { steps: number; fragment: number; outer_lr: number; hidden_s: number; model_count?: number };

export interface DilocoResult extends SyncResult {
  /** The inner steps the round covered, and the fragment it synced. */
  firstStep: number;
  innerSteps: number;
  fragment: number;
  outerLr: number;
  /** Per member: seconds of the sync's communication hidden behind inner steps. */
  hiddenS: number;
}

/**
 * `diloco` (DiLoCo, arXiv 2311.08105; Streaming DiLoCo, 2501.18512): each round is
 * inner_steps / fragments local inner steps on every worker, then the all-reduce of one
 * fragment's pseudo-gradient and an outer step (python-runtime/nimble_worker/strategies/diloco.py).
 *
 * Heterogeneous workers: every inner step is the global batch split by shares, which with
 * `balance: measured` follow each worker's measured samples/s, so a worker twice as fast
 * takes twice the share and every worker's inner step takes about the same time: the
 * slowest does not set the pace, and pseudo-gradients are weighted by the samples behind
 * them. A round that a fault interrupts is run again with the survivors' shares unchanged
 * (the lost members' zeroed), so the survivors keep the inner steps they already did and
 * only their sync is redone.
 */
export class DilocoStrategy extends SyncStrategy {
  override readonly name = "diloco";
  override readonly stepsPerRound: number;
  override readonly reportOp = "round_done";
  readonly #cfg: DilocoConfig;
  /** The last round planned, and after a member was lost mid-round, the shares to redo it with. */
  #last: DilocoPlan | null = null;
  #retry: { round: number; shares: number[] } | null = null;

  constructor(members: readonly number[], opts: SyncOptions, cfg: DilocoConfig) {
    super(members, opts);
    this.#cfg = cfg;
    this.stepsPerRound = cfg.inner_steps / cfg.fragments;
  }

  /** Slow workers are not left out under diloco: their shares shrink instead (see above). */
  override get leaveOutAfter(): number {
    return -1;
  }

  override plan(round: number, members: readonly number[], worldSize: number, opts: PlanOptions): DilocoPlan {
    const fragment = Math.floor(round / this.stepsPerRound) % this.#cfg.fragments;
    if (this.#retry && this.#retry.round === round) {
      const shares = [...this.#retry.shares];
      if (shares.some((s, rank) => s > 0 && !members.includes(rank))) throw new Error(`diloco: the retry of round ${round} has shares for ranks out of the ring`);
      this.#last = { round, members: [...members], wantHash: opts.wantHash, shares, steps: this.stepsPerRound, fragment };
      return this.#last;
    }
    this.#retry = null;
    this.#last = { ...super.plan(round, members, worldSize, opts), steps: this.stepsPerRound, fragment };
    return this.#last;
  }

  override order(plan: SyncPlan): CoordinatorOrder {
    return { op: "round", step: plan.round, steps: this.stepsPerRound, shares: plan.shares, want_hash: plan.wantHash };
  }

  override fold(plan: SyncPlan, reports: ReadonlyMap<number, RoundReport>): DilocoResult {
    const base = super.fold(plan, reports);
    const got = plan.members.map((rank) => reports.get(rank) as DilocoReport);
    const samples = got.reduce((a, rep) => a + rep.samples, 0);
    const steps = got[0].steps;
    for (const [k, rep] of got.entries()) {
      if (rep.steps !== steps || rep.fragment !== got[0].fragment) {
        throw new Error(`Replicas disagree about round ${plan.round}: rank ${plan.members[0]} ran ${steps} inner steps and synced fragment ${got[0].fragment}, rank ${plan.members[k]} ${rep.steps} and ${rep.fragment}`);
      }
    }
    const size = plan.members.length;
    // What a plain float32 all-reduce of the whole gradient at every inner step would have sent (DDP).
    const modelCount = (rep: DilocoReport) => rep.model_count ?? rep.dense_count * this.#cfg.fragments;
    const perStep = got.map((rep, k) => (size > 1 && modelCount(rep) > 0 ? expectedFrameBytesPerNode(modelCount(rep), size, k, "f32") : 0));
    const uncompressed = perStep.reduce((a, b) => a + b, 0) * steps;
    return {
      ...base,
      round: plan.round + steps - 1,
      loss: samples > 0 ? got.reduce((a, rep) => a + rep.loss * rep.samples, 0) / samples : 0,
      samples,
      uncompressedBytes: uncompressed,
      workers: base.workers.map((w, k) => ({ ...w, uncompressed_bytes: perStep[k] * steps })),
      firstStep: plan.round,
      innerSteps: steps,
      fragment: got[0].fragment,
      outerLr: got[0].outer_lr,
      hiddenS: Math.max(...got.map((rep) => rep.hidden_s ?? 0)),
    };
  }

  override membersChanged(change: MembersChange): void {
    super.membersChanged(change);
    // A member lost mid-round: the survivors redo only the round's sync, with their shares as they were.
    if (this.#last && change.left.length > 0 && change.joined.length === 0) {
      this.#retry = { round: this.#last.round, shares: this.#last.shares.map((s, rank) => (change.left.includes(rank) ? 0 : s)) };
    } else {
      this.#retry = null;
    }
  }
}
