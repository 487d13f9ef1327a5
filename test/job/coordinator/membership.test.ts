import { describe, expect, it } from "vitest";
import { Membership, quorum, type QuorumInput } from "../../../src/job/coordinator/membership.js";

const base: QuorumInput = { active: [0, 1, 2, 3], lost: [], joiners: [], minWorkers: 1, waitMs: 300_000, shortSince: null };
const at = (over: Partial<QuorumInput>, now = 1_000) => quorum({ ...base, ...over }, now);

describe("quorum (pure)", () => {
  it("goes on with every member when nothing changed", () => {
    expect(at({})).toEqual({ decision: "quorum", members: [0, 1, 2, 3], dropped: [], joining: [] });
  });

  it("drops the lost and keeps ring order", () => {
    expect(at({ lost: [2] })).toEqual({ decision: "quorum", members: [0, 1, 3], dropped: [2], joining: [] });
    // A loss named twice, or a rank lost that is not a member, drops nothing more.
    expect(at({ lost: [2, 2, 7] })).toMatchObject({ members: [0, 1, 3], dropped: [2] });
  });

  it("takes joiners in, in rank order, unless they are lost too", () => {
    expect(at({ active: [0, 2], joiners: [3, 1] })).toEqual({ decision: "quorum", members: [0, 1, 2, 3], dropped: [], joining: [1, 3] });
    expect(at({ active: [0, 2], joiners: [1], lost: [1] })).toMatchObject({ members: [0, 2], joining: [] });
    // A joiner that is already a member is no newcomer.
    expect(at({ active: [0, 1], joiners: [1] })).toMatchObject({ members: [0, 1], joining: [] });
  });

  it("fails when no member that holds the training state is left, whoever joins", () => {
    const q = at({ active: [0, 1], lost: [0, 1], joiners: [2, 3], cause: "provider lost (a: gone)" });
    expect(q).toMatchObject({ decision: "fail", reason: "No worker left after provider lost (a: gone): none holds the training state" });
    expect(q.decision === "fail" && q.hint).toMatch(/--resume/);
  });

  it("waits below min_workers, counting joiners, until wait_s has passed, then fails with the figures", () => {
    const short = { active: [0, 1, 2], lost: [1, 2], minWorkers: 2, waitMs: 5_000 };
    expect(at(short)).toEqual({ decision: "wait", reason: "1 worker left, faults.min_workers is 2", until: 6_000, dropped: [1, 2] });
    expect(at({ ...short, shortSince: 1_000 }, 5_999)).toMatchObject({ decision: "wait", until: 6_000 });
    expect(at({ ...short, shortSince: 1_000, joiners: [3] }, 5_999)).toMatchObject({ decision: "quorum", members: [0, 3], joining: [3] });
    const late = at({ ...short, shortSince: 1_000, cause: "worker died (x)" }, 6_001);
    expect(late).toMatchObject({ decision: "fail", reason: "1 worker left after worker died (x), and no provider came back within 5 s; faults.min_workers is 2" });
    expect(late.decision === "fail" && late.hint).toMatch(/lower faults\.min_workers/);
  });

  it("with wait_s 0 fails at once below min_workers", () => {
    expect(at({ lost: [1, 2, 3], minWorkers: 2, waitMs: 0, shortSince: 1_000 }, 1_001)).toMatchObject({ decision: "fail" });
  });
});

describe("Membership (transitions)", () => {
  it("re-forms by epoch, settles joiners and forgets the losses of ranks that came back", () => {
    const m = new Membership([0, 1, 2]);
    expect(m.epoch).toBe(0);
    expect(m.noteFault({ kind: "worker died", ranks: [1], reason: "r1", at: 1 })).toBe(true);
    // The same loss told again is no new fault.
    expect(m.noteFault({ kind: "provider lost", ranks: [1], reason: "r1, again", at: 2 })).toBe(false);
    // A ring cut names nobody: always a new fault.
    expect(m.noteFault({ kind: "ring broken", ranks: [], reason: "cut", at: 3 })).toBe(true);
    expect(m.takeFaults().map((f) => f.reason)).toEqual(["r1", "cut"]);
    expect(m.pendingFaults).toEqual([]);
    expect(m.reform([0, 2])).toBe(1);
    m.joinerReady(1);
    m.joinerReady(2); // a member is not a joiner
    expect(m.joiners).toEqual([1]);
    expect(m.reform([0, 1, 2])).toBe(2);
    expect(m.joiners).toEqual([]);
    expect(m.active).toEqual([0, 1, 2]);
    // Rank 1 came back: a new loss of it is news again.
    expect(m.noteFault({ kind: "worker died", ranks: [1], reason: "r1 again", at: 4 })).toBe(true);
  });
});
