import { describe, expect, it } from "vitest";
import { expectedFrameBytesPerNode } from "../../src/collective/ring.js";
import { DilocoStrategy, type DilocoConfig, type DilocoReport } from "../../src/strategy/diloco.js";
import type { SyncOptions } from "../../src/strategy/sync.js";

const opts = (over: Partial<SyncOptions> = {}): SyncOptions => ({
  batchSize: 12,
  balance: "equal",
  compression: { method: "none" },
  initialRates: [0, 0, 0],
  ...over,
});
const cfg = (over: Partial<DilocoConfig> = {}): DilocoConfig => ({
  name: "diloco",
  inner_steps: 8,
  outer_optimizer: { name: "sgd", lr: 0.7, momentum: 0.9, nesterov: true },
  fragments: 2,
  overlap_steps: 1,
  alpha: 0,
  codec: "int8",
  ...over,
});

function report(rank: number, step: number, samples: number, over: Partial<DilocoReport> = {}): DilocoReport {
  return {
    rank, step, loss: 1 + rank, samples, lr: 0.1, compute_s: 1, forward_backward_s: 0.9, comm_s: 0.05, skipped: false,
    micro_batches: 4, max_micro_batch: null, bytes_sent: 500, dense_count: 60, model_count: 100,
    steps: 4, fragment: Math.floor(step / 4) % 2, outer_lr: 0.7, hidden_s: 0.2, ...over,
  } as DilocoReport;
}

describe("diloco strategy: rounds", () => {
  it("plans rounds of inner_steps / fragments steps, syncing the fragments in turn", () => {
    const s = new DilocoStrategy([0, 1, 2], opts(), cfg());
    expect(s.stepsPerRound).toBe(4);
    const plans = [0, 4, 8, 12].map((t) => s.plan(t, [0, 1, 2], 3, { wantHash: false }));
    expect(plans.map((p) => p.fragment)).toEqual([0, 1, 0, 1]);
    expect(s.order(plans[1])).toEqual({ op: "round", step: 4, steps: 4, shares: [4, 4, 4], want_hash: false });
    expect(s.leaveOutAfter).toBe(-1);
  });

  it("folds a round: sample-weighted loss, the round's last step, bytes against DDP's every inner step", () => {
    const s = new DilocoStrategy([0, 1], opts({ batchSize: 10 }), cfg());
    const plan = s.plan(4, [0, 1], 2, { wantHash: false });
    const r = s.fold(plan, new Map([[0, report(0, 4, 4 * 5)], [1, report(1, 4, 4 * 5, { loss: 3 })]]));
    expect(r.round).toBe(7); // steps done after it: 8
    expect(r.samples).toBe(40);
    expect(r.loss).toBeCloseTo(2);
    expect({ fragment: r.fragment, firstStep: r.firstStep, innerSteps: r.innerSteps, hiddenS: r.hiddenS }).toEqual({ fragment: 1, firstStep: 4, innerSteps: 4, hiddenS: 0.2 });
    const ddpPerStep = expectedFrameBytesPerNode(100, 2, 0, "f32") + expectedFrameBytesPerNode(100, 2, 1, "f32");
    expect(r.uncompressedBytes).toBe(ddpPerStep * 4);
  });

  it("refuses reports that disagree on the round's shape", () => {
    const s = new DilocoStrategy([0, 1], opts(), cfg());
    const plan = s.plan(0, [0, 1], 2, { wantHash: false });
    expect(() => s.fold(plan, new Map([[0, report(0, 0, 24)], [1, report(1, 0, 24, { fragment: 1 })]]))).toThrow(/disagree about round 0/);
  });

  it("redoes a round a member was lost in with the survivors' shares unchanged, so their inner steps stand", () => {
    const s = new DilocoStrategy([0, 1, 2], opts(), cfg());
    expect(s.plan(8, [0, 1, 2], 3, { wantHash: false }).shares).toEqual([4, 4, 4]);
    s.membersChanged({ members: [0, 2], left: [1], joined: [] });
    expect(s.plan(8, [0, 2], 3, { wantHash: true }).shares).toEqual([4, 0, 4]);
    // The next round splits the batch among the survivors again.
    expect(s.plan(12, [0, 2], 3, { wantHash: false }).shares).toEqual([6, 0, 6]);
    // A joiner changes the round: no retry shares.
    s.membersChanged({ members: [0, 1, 2], left: [], joined: [1] });
    expect(s.plan(16, [0, 1, 2], 3, { wantHash: false }).shares).toEqual([4, 4, 4]);
  });
});
