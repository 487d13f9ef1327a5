import { describe, expect, it } from "vitest";
import { isGone, isLoaded, transition, viewState, type RankEvent, type RankState } from "../../../src/job/provider/lifecycle.js";

const run = (events: RankEvent[], from: RankState = "spawning") => events.reduce(transition, from);

describe("a rank's lifecycle", () => {
  it("loads, links into the ring and steps; a re-forming ring keeps it stepping", () => {
    expect(run(["loaded"])).toBe("loaded");
    expect(run(["loaded", "linked"])).toBe("in_ring");
    expect(run(["loaded", "linked", "round", "round"])).toBe("stepping");
    expect(run(["loaded", "linked", "round", "unlinked", "linked", "round"])).toBe("stepping");
    // Its first ring may form before or after it loads: the job waits for both.
    expect(run(["loaded", "unlinked", "linked"])).toBe("in_ring");
  });

  it("a crash restarts it from any live state, and it comes back loaded (a joiner)", () => {
    for (const s of ["spawning", "loaded", "in_ring", "stepping", "restarting"] as const) expect(transition(s, "crashed")).toBe("restarting");
    expect(run(["loaded", "linked", "round", "crashed", "loaded"])).toBe("loaded");
  });

  it("left and stopped are final", () => {
    expect(run(["loaded", "linked", "left", "stopped", "crashed", "unlinked"])).toBe("left");
    expect(run(["stopped", "left", "crashed"])).toBe("stopped");
    expect(isGone("left") && isGone("stopped") && !isGone("restarting")).toBe(true);
  });

  it("refuses events a state cannot take (a bug, named)", () => {
    expect(() => transition("spawning", "round")).toThrow('a rank that is spawning cannot take "round"');
    expect(() => transition("loaded", "round")).toThrow(/loaded cannot take "round"/);
    expect(() => transition("restarting", "linked")).toThrow(/restarting/);
    expect(() => transition("left", "loaded")).toThrow(/left/);
  });

  it("is shown as the views name it", () => {
    expect(["spawning", "restarting", "loaded", "in_ring", "stepping", "left", "stopped"].map((s) => viewState(s as RankState))).toEqual([
      "starting",
      "restarting",
      "ready",
      "ready",
      "training",
      "left",
      "stopped",
    ]);
    expect(["loaded", "in_ring", "stepping"].every((s) => isLoaded(s as RankState))).toBe(true);
    expect(isLoaded("spawning")).toBe(false);
  });
});
