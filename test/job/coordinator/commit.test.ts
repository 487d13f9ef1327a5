import { describe, expect, it } from "vitest";
import { Commits, verdictFor } from "../../../src/job/coordinator/commit.js";

describe("round decisions", () => {
  it("commits a round whose reports are in, aborts one a fault interrupted", () => {
    expect(verdictFor("reported")).toBe("commit");
    expect(verdictFor("fault")).toBe("abort");
  });

  it("rides once on the next orders, and a flush repeats the last", () => {
    const c = new Commits();
    expect(c.ride()).toEqual({});
    expect(c.flush()).toBeNull();
    c.decide(0, "reported");
    expect(c.waiting).toBe(true);
    expect(c.ride()).toEqual({ decision: { step: 0, verdict: "commit" } });
    expect(c.ride()).toEqual({});
    expect(c.waiting).toBe(false);
    expect(c.flush()).toEqual({ step: 0, verdict: "commit" });
  });

  it("a fault mid-round aborts it, after the previous decision rode on its orders", () => {
    const c = new Commits();
    c.decide(4, "reported");
    expect(c.ride()).toEqual({ decision: { step: 4, verdict: "commit" } }); // on step 5's orders
    c.decide(5, "fault");
    expect(c.flush()).toEqual({ step: 5, verdict: "abort" });
    expect(c.ride()).toEqual({});
  });

  it("refuses to decide a round while the previous decision was never sent", () => {
    const c = new Commits();
    c.decide(1, "reported");
    expect(() => c.decide(2, "reported")).toThrow(/round 1's decision was never sent/);
    c.flush();
    expect(c.decide(2, "reported")).toEqual({ step: 2, verdict: "commit" });
  });
});
