/**
 * A test-only strategy that proves the seam: local SGD, averaging the parameters every k
 * rounds. Not offered to users. Its reports are `eval_done` messages whose `sums` carry
 * the loss and the parameters (a toy model of `dim` numbers), so that it runs on the
 * coordinator's real exchanges and decisions, with two rounds in flight at once.
 */
import type { MessageOf } from "../../src/job/coordinator/exchanges.js";
import type { MembersChange, PlanOptions, RoundPlan, RoundResult, Strategy } from "../../src/strategy/types.js";

export type LocalSgdReport = MessageOf<"eval_done">;

export interface LocalSgdPlan extends RoundPlan {
  /** Members average their parameters at the end of this round. */
  average: boolean;
}

export interface LocalSgdResult extends RoundResult {
  /** The averaged parameters (every member reported the same), on averaging rounds. */
  params: number[] | null;
}

export class LocalSgd implements Strategy<LocalSgdPlan, LocalSgdResult, LocalSgdReport> {
  readonly name = "local_sgd";
  members: number[];
  averages = 0;

  constructor(
    members: readonly number[],
    readonly every: number,
    readonly dim: number,
  ) {
    this.members = [...members];
  }

  plan(round: number, members: readonly number[], _worldSize: number, opts: PlanOptions): LocalSgdPlan {
    return { round, members: [...members], wantHash: opts.wantHash, average: (round + 1) % this.every === 0 };
  }

  fold(plan: LocalSgdPlan, reports: ReadonlyMap<number, LocalSgdReport>): LocalSgdResult {
    const got = plan.members.map((rank) => {
      const rep = reports.get(rank);
      if (!rep || rep.step !== plan.round) throw new Error(`local_sgd: no report of round ${plan.round} from rank ${rank}`);
      return rep;
    });
    const paramsOf = (rep: LocalSgdReport) => Array.from({ length: this.dim }, (_, i) => rep.sums[`p${i}`]);
    let params: number[] | null = null;
    if (plan.average) {
      params = paramsOf(got[0]);
      for (const rep of got) {
        if (paramsOf(rep).some((v, i) => v !== params![i])) throw new Error(`local_sgd: replicas differ after averaging round ${plan.round}`);
      }
      this.averages += 1;
    }
    const samples = got.reduce((a, rep) => a + rep.count, 0);
    const loss = got.reduce((a, rep) => a + rep.sums.loss * rep.count, 0) / samples;
    return { round: plan.round, skipped: false, loss, samples, lr: 0, bytesSent: 0, uncompressedBytes: 0, params };
  }

  membersChanged(change: MembersChange): void {
    this.members = [...change.members];
  }

  state(): Record<string, unknown> {
    return { averages: this.averages };
  }

  load(state: Record<string, unknown>): void {
    this.averages = Number(state.averages);
  }
}

/** One local step of rank r's toy model: gradient descent on 0.5 |x - target(r)|^2. */
export function localStep(x: readonly number[], rank: number, round: number, lr: number): { x: number[]; loss: number } {
  const target = x.map((_, i) => Math.sin(rank + 1 + i) + 0.01 * round);
  const loss = x.reduce((a, v, i) => a + 0.5 * (v - target[i]) ** 2, 0);
  return { x: x.map((v, i) => v - lr * (v - target[i])), loss };
}

/** The members' mean, summed in rank order (the same on every member). */
export function mean(xs: readonly (readonly number[])[]): number[] {
  return xs[0].map((_, i) => xs.reduce((a, x) => a + x[i], 0) / xs.length);
}
