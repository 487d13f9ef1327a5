import { describe, expect, it } from "vitest";
import { Commits } from "../../src/job/coordinator/commit.js";
import { FaultError } from "../../src/job/coordinator/errors.js";
import { Exchanges } from "../../src/job/coordinator/exchanges.js";
import type { Decision } from "../../src/protocol/messages.js";
import { LocalSgd, localStep, mean, type LocalSgdPlan, type LocalSgdResult } from "./localSgd.js";

const LR = 0.3;
const DIM = 3;
const EVERY = 3;
const start = (rank: number) => Array.from({ length: DIM }, (_, i) => rank - i);

/** The members' averaging collective (a barrier per round), re-formed by epoch. */
class Group {
  epoch = 0;
  #posted = new Map<number, { x: Map<number, number[]>; members: number[]; waiters: { resolve: (x: number[]) => void; reject: (e: Error) => void }[] }>();

  average(epoch: number, round: number, members: number[], rank: number, x: number[]): Promise<number[]> {
    if (epoch !== this.epoch) return Promise.reject(new Error("stale epoch"));
    const slot = this.#posted.get(round) ?? { x: new Map(), members, waiters: [] };
    this.#posted.set(round, slot);
    slot.x.set(rank, x);
    return new Promise((resolve, reject) => {
      slot.waiters.push({ resolve, reject });
      if (slot.x.size === slot.members.length) {
        const avg = mean(slot.members.map((r) => slot.x.get(r)!));
        this.#posted.delete(round);
        for (const w of slot.waiters) w.resolve(avg);
      }
    });
  }

  reform(): void {
    this.epoch += 1;
    for (const slot of this.#posted.values()) for (const w of slot.waiters) w.reject(new Error("ring re-formed"));
    this.#posted.clear();
  }
}

/** A worker of the toy model: orders in sequence, up to two undecided rounds held. */
class SimWorker {
  committed: number[];
  staged: { round: number; x: number[] }[] = [];
  dead = false;
  #queue: Promise<void> = Promise.resolve();

  constructor(
    readonly rank: number,
    private readonly group: Group,
    private readonly deliver: (round: number, loss: number, x: number[]) => void,
    /** This worker dies as it starts this round (its provider then reports it lost). */
    private readonly dieAt?: { round: number; onDeath: () => void },
  ) {
    this.committed = start(rank);
  }

  /** The one place a decision is applied: a commit applies the oldest round; an abort drops it and every round after it. */
  decide(decision: Decision | undefined): void {
    this.#queue = this.#queue.then(() => {
      if (!decision) return;
      if (decision.verdict === "abort") {
        this.staged = this.staged.filter((s) => s.round < decision.step);
        return;
      }
      const i = this.staged.findIndex((s) => s.round === decision.step);
      if (i < 0) return; // flushed again, or never held
      if (i !== 0) throw new Error(`rank ${this.rank}: commit of ${decision.step} before ${this.staged[0].round}`);
      this.committed = this.staged.shift()!.x;
    });
  }

  order(plan: LocalSgdPlan, decision: Decision | undefined, epoch: number): void {
    this.decide(decision);
    this.#queue = this.#queue.then(async () => {
      if (this.dead) return;
      if (this.dieAt && plan.round === this.dieAt.round) {
        this.dead = true;
        return this.dieAt.onDeath();
      }
      const from = this.staged.at(-1)?.x ?? this.committed;
      let { x, loss } = localStep(from, this.rank, plan.round, LR);
      try {
        if (plan.average) x = await this.group.average(epoch, plan.round, plan.members, this.rank, x);
      } catch {
        return; // the ring re-formed: this round is being aborted
      }
      this.staged.push({ round: plan.round, x });
      const out = x;
      setTimeout(() => this.deliver(plan.round, loss, out), (this.rank * 7 + plan.round * 3) % 5);
    });
  }
}

/** The same training, one member after another in one loop: the reference. */
function reference(rounds: number, members: number[], loseAt?: { round: number; rank: number }): Map<number, number[]> {
  const x = new Map(members.map((r) => [r, start(r)]));
  for (let round = 0; round < rounds; round++) {
    if (loseAt && round === loseAt.round) x.delete(loseAt.rank);
    const ranks = [...x.keys()];
    for (const r of ranks) x.set(r, localStep(x.get(r)!, r, round, LR).x);
    if ((round + 1) % EVERY === 0) {
      const avg = mean(ranks.map((r) => x.get(r)!));
      for (const r of ranks) x.set(r, avg);
    }
  }
  return x;
}

/** Drive the strategy through the coordinator's exchanges and decisions, two rounds in flight. */
async function drive(rounds: number, ranks: number[], loseAt?: { round: number; rank: number }) {
  const exchanges = new Exchanges();
  const commits = new Commits();
  const group = new Group();
  const strategy = new LocalSgd(ranks, EVERY, DIM);
  let members = [...ranks];
  const death = (rank: number) => () => {
    setTimeout(() => exchanges.interrupt(new FaultError({ kind: "worker died", ranks: [rank], reason: "killed", at: Date.now() })), 10);
  };
  const sims = ranks.map(
    (rank) =>
      new SimWorker(
        rank,
        group,
        (round, loss, x) => exchanges.deliver({ t: "eval_done", rank, step: round, count: 1, sums: { loss, ...Object.fromEntries(x.map((v, i) => [`p${i}`, v])) } }),
        loseAt?.rank === rank ? { round: loseAt.round, onDeath: death(rank) } : undefined,
      ),
  );
  const sent: Decision[] = [];
  const flush = () => {
    const d = commits.flush();
    if (d) for (const r of members) sims[r].decide(d);
  };
  const inFlight: { plan: LocalSgdPlan; done: Promise<Map<number, never>> }[] = [];
  const results: LocalSgdResult[] = [];
  let most = 0;
  let next = 0;
  while (next < rounds || inFlight.length > 0) {
    while (inFlight.length < 2 && next < rounds) {
      const plan = strategy.plan(next++, members, ranks.length, { wantHash: false });
      const done = exchanges.expect("eval_done", `round ${plan.round}`, plan.members, 5_000, (m) => m.step === plan.round);
      const { decision } = commits.ride();
      if (decision) sent.push(decision);
      for (const r of plan.members) sims[r].order(plan, decision, group.epoch);
      inFlight.push({ plan, done: done as Promise<Map<number, never>> });
      most = Math.max(most, exchanges.inFlight);
    }
    const head = inFlight.shift()!;
    try {
      const result = strategy.fold(head.plan, await head.done);
      if (commits.waiting) flush(); // no order carried the last decision (the end is near)
      commits.decide(head.plan.round, "reported");
      results.push(result);
    } catch (err) {
      if (!(err instanceof FaultError)) throw err;
      // Aborting the oldest round in flight aborts the ones after it too.
      for (const later of inFlight) later.done.catch(() => {});
      inFlight.length = 0;
      if (commits.waiting) flush();
      commits.decide(head.plan.round, "fault");
      sent.push(commits.flush()!);
      members = members.filter((r) => !err.fault.ranks.includes(r));
      for (const r of members) sims[r].decide(sent.at(-1));
      group.reform();
      strategy.membersChanged({ members, left: err.fault.ranks, joined: [] });
      next = head.plan.round;
    }
  }
  flush();
  // Let the last decision reach every worker's queue.
  await new Promise((r) => setTimeout(r, 20));
  return { sims, members, results, most, sent, strategy };
}

describe("the strategy seam, proved by a test-only local SGD", () => {
  it("runs with two rounds in flight and ends where one process does", async () => {
    const { sims, results, most, strategy } = await drive(9, [0, 1, 2]);
    expect(most).toBe(2);
    expect(results.map((r) => r.round)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8]);
    expect(strategy.averages).toBe(3);
    const want = reference(9, [0, 1, 2]);
    for (const s of sims) {
      expect(s.staged).toEqual([]);
      expect(s.committed).toEqual(want.get(s.rank));
    }
    expect(results[8].params).toEqual(want.get(0));
    const copy = new LocalSgd([0], EVERY, DIM);
    copy.load(strategy.state());
    expect(copy.averages).toBe(3);
  });

  it("a member lost mid-round aborts that round and the one after it; the rest redo them and match one process", async () => {
    const { sims, members, results, sent } = await drive(9, [0, 1, 2], { round: 4, rank: 2 });
    expect(members).toEqual([0, 1]);
    expect(sent.filter((d) => d.verdict === "abort")).toEqual([{ step: 4, verdict: "abort" }]);
    // Every round is decided once for good: aborted rounds run again and then commit.
    expect(results.map((r) => r.round)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8]);
    const want = reference(9, [0, 1, 2], { round: 4, rank: 2 });
    for (const r of members) expect(sims[r].committed).toEqual(want.get(r));
  });
});
