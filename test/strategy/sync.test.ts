import { describe, expect, it } from "vitest";
import { expectedFrameBytesPerNode } from "../../src/collective/ring.js";
import { SyncStrategy, type SyncOptions } from "../../src/strategy/sync.js";
import type { RoundReport } from "../../src/strategy/types.js";

const opts = (over: Partial<SyncOptions> = {}): SyncOptions => ({
  batchSize: 12,
  balance: "measured",
  compression: { method: "powersgd", rank: 4, start_step: 10, min_compression_rate: 2, error_feedback: true, warm_start: true, seed: 0 },
  initialRates: [0, 0, 0, 0],
  ...over,
});

function report(rank: number, step: number, samples: number, over: Partial<RoundReport> = {}): RoundReport {
  return {
    t: "step_done",
    rank,
    step,
    loss: 1 + rank,
    samples,
    lr: 0.1,
    compute_s: samples / 100,
    forward_backward_s: samples / 100,
    comm_s: 0.01,
    skipped: false,
    micro_batches: 1,
    max_micro_batch: null,
    bytes_sent: 1000,
    dense_count: 1000,
    ...over,
  };
}

const reportsOf = (step: number, shares: number[], members: number[], over: Partial<RoundReport> = {}) =>
  new Map(members.map((rank) => [rank, report(rank, step, shares[rank], over)]));

describe("sync strategy: planning", () => {
  it("splits the batch by profile rates, one share per rank the job has had", () => {
    const s = new SyncStrategy([0, 1, 2], opts({ initialRates: [100, 200, 300] }));
    const plan = s.plan(0, [0, 1, 2], 4, { wantHash: false });
    expect(plan.shares).toEqual([2, 4, 6, 0]);
    expect(plan.shares.reduce((a, b) => a + b)).toBe(12);
    // Without a profile for every rank, equal rates.
    expect(new SyncStrategy([0, 1, 2], opts({ initialRates: [100, 0, 300] })).plan(0, [0, 1, 2], 3, { wantHash: true })).toMatchObject({ shares: [4, 4, 4], wantHash: true });
  });

  it("plans only for the members it holds shares for", () => {
    const s = new SyncStrategy([0, 1], opts());
    expect(() => s.plan(0, [0, 2], 3, { wantHash: false })).toThrow(/planned for ranks 0, 2/);
  });

  it("balance: equal splits evenly whatever the speeds", () => {
    const s = new SyncStrategy([0, 1, 2], opts({ balance: "equal", initialRates: [1, 10, 100] }));
    expect(s.plan(0, [0, 1, 2], 3, { wantHash: false }).shares).toEqual([4, 4, 4]);
    expect(s.rates).toBeNull();
    expect(s.leaveOut(String, new Map(), 1)).toEqual([]);
  });
});

describe("sync strategy: folding", () => {
  it("weighs the loss by samples and sums the bytes; idle time is the wait for the slowest", () => {
    const s = new SyncStrategy([0, 1], opts({ batchSize: 12 }));
    const plan = s.plan(7, [0, 1], 2, { wantHash: false });
    const r = s.fold(plan, reportsOf(7, plan.shares, [0, 1]));
    // What one float32 ring all-reduce of the 1000-element gradient would send from each member.
    const plain = expectedFrameBytesPerNode(1000, 2, 0, "f32") + expectedFrameBytesPerNode(1000, 2, 1, "f32");
    expect(plain).toBeGreaterThan(2 * 4000 * 0.5);
    expect(r).toMatchObject({ round: 7, skipped: false, samples: 12, bytesSent: 2000, uncompressedBytes: plain, lr: 0.1 });
    const alone = new SyncStrategy([0], opts());
    expect(alone.fold(alone.plan(0, [0], 1, { wantHash: false }), reportsOf(0, [12], [0])).uncompressedBytes).toBe(0);
    expect(r.loss).toBeCloseTo((1 * 6 + 2 * 6) / 12);
    expect(r.workers.map((w) => w.idle_s)).toEqual([0, 0]);
  });

  it("a skipped step on every replica folds as skipped with the non-finite names; a disagreement throws", () => {
    const s = new SyncStrategy([0, 1], opts());
    const plan = s.plan(3, [0, 1], 2, { wantHash: false });
    const skipped = s.fold(plan, reportsOf(3, plan.shares, [0, 1], { skipped: true, nonfinite: ["loss"] }));
    expect(skipped).toMatchObject({ skipped: true, nonfinite: ["loss (rank 0)", "loss (rank 1)"] });
    const mixed = reportsOf(3, plan.shares, [0, 1]);
    mixed.set(1, report(1, 3, 6, { skipped: true }));
    expect(() => s.fold(plan, mixed)).toThrow("Replicas disagree about skipping step 3: rank 0 applied it, rank 1 did not");
    expect(() => s.fold(plan, new Map([[0, report(0, 3, 6)]]))).toThrow(/no report of step 3 from rank 1/);
  });

  it("measured speeds move the shares toward the faster worker, and say so", () => {
    const s = new SyncStrategy([0, 1], opts());
    let moved = null;
    for (let step = 0; step < 8 && !moved; step++) {
      const plan = s.plan(step, [0, 1], 2, { wantHash: false });
      // rank 1 is three times as fast as rank 0
      const reps = new Map([0, 1].map((rank) => [rank, report(rank, step, plan.shares[rank], { forward_backward_s: plan.shares[rank] / (rank === 1 ? 300 : 100) })]));
      moved = s.fold(plan, reps).sharesChanged;
    }
    expect(moved).not.toBeNull();
    expect(moved!.shares[1]).toBeGreaterThan(moved!.shares[0]);
    expect(s.shares).toEqual(moved!.shares);
  });

  it("with orders a step ahead of reports, a slowdown moves shares once, from the reports' own samples", () => {
    const s = new SyncStrategy([0, 1, 2], opts({ batchSize: 1024, initialRates: [0, 0, 0] }));
    const speed = (step: number) => (step < 20 ? [4000, 2000, 1000] : [1000, 2000, 1000]);
    const plans = [s.plan(0, [0, 1, 2], 3, { wantHash: false })];
    const moves: number[] = [];
    for (let step = 0; step < 40; step++) {
      // Step step+1 is ordered before step's reports are in: it runs the shares decided after step-1.
      plans.push(s.plan(step + 1, [0, 1, 2], 3, { wantHash: false }));
      const plan = plans[step];
      const reps = new Map([0, 1, 2].map((rank) => [rank, report(rank, step, plan.shares[rank], { forward_backward_s: plan.shares[rank] / speed(step)[rank] })]));
      if (s.fold(plan, reps).sharesChanged) moves.push(step);
    }
    // Measured after step 1, first run at step 3; the slowdown seen at steps 20 and 21, its shares run from step 23.
    expect(moves).toEqual([1, 21]);
    expect(plans[22].shares).toEqual(plans[19].shares);
    expect(plans[23].shares).toEqual([256, 512, 256]);
    expect(plans[40].shares).toEqual([256, 512, 256]);
  });
});

describe("sync strategy: members changing", () => {
  it("keeps the measured rates of those who stay, and gives newcomers the mean", () => {
    const s = new SyncStrategy([0, 1, 2], opts({ initialRates: [100, 200, 300] }));
    s.membersChanged({ members: [0, 2], left: [1], joined: [] });
    expect(s.rates).toEqual([100, 300]);
    expect(s.plan(0, [0, 2], 3, { wantHash: false }).shares).toEqual([3, 0, 9]);
    s.membersChanged({ members: [0, 1, 2], left: [], joined: [1] });
    expect(s.rates).toEqual([100, 200, 300]);
  });

  it("leaves out a worker whose link would slow every step, with the figures", () => {
    const s = new SyncStrategy([0, 1, 2], opts({ batchSize: 64, initialRates: [1000, 1000, 1000] }));
    const links = new Map([
      [0, 100e6],
      [1, 100e6],
      [2, 10e3],
    ]);
    const out = s.leaveOut((rank) => `rank ${rank}`, links, 1e5);
    expect(out.map((o) => o.rank)).toEqual([2]);
    expect(out[0].reason).toMatch(/^worker rank 2: its link \(10.0 kB\/s\)/);
    expect(s.leaveOutAfter).toBe(11); // powersgd from step 10: two compressed steps measured
    expect(new SyncStrategy([0], opts({ compression: { method: "none" } })).leaveOutAfter).toBe(2);
  });
});
