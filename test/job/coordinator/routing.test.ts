import { describe, expect, it } from "vitest";
import { route, type RouteState } from "../../../src/job/coordinator/routing.js";

const state = (over: Partial<RouteState> = {}): RouteState => ({ phase: "training", epoch: 3, isActive: (r) => r !== 5, hosts: (r) => r < 8, ...over });
const info = { params: 1, param_bytes: 4, model: "m", train_size: 1, val_size: 1 };

describe("what a provider's message means", () => {
  it("a dead worker is a fault while training, a failure before", () => {
    const died = { t: "failed", rank: 2, message: "killed", kind: "worker" } as const;
    expect(route(died, "a", state())).toEqual({ action: "fault", fault: { kind: "worker died", ranks: [2], reason: "killed" } });
    expect(route(died, "a", state({ phase: "starting" }))).toEqual({ action: "fail", message: "rank 2 on provider a failed: killed", kind: "worker" });
    // Out of the ring already: news of it, not a new fault.
    expect(route({ ...died, rank: 5 }, "a", state())).toEqual({ action: "retell", rank: 5, message: "killed" });
  });

  it("a config error names its field; a task error fails the job", () => {
    expect(route({ t: "failed", rank: 0, message: "too big", field: "compression.rank", kind: "config" }, "a", state())).toEqual({
      action: "config error",
      field: "compression.rank",
      message: "too big",
    });
    expect(route({ t: "failed", rank: 1, message: "boom", where: "task.py: build_model", kind: "task" }, "a", state())).toEqual({
      action: "fail",
      message: "rank 1 on provider a failed: task.py: build_model: boom",
      kind: "task",
      where: "task.py: build_model",
    });
  });

  it("a ring loss counts once per epoch, and not while recovering", () => {
    const lost = { t: "ring_lost", rank: 1, epoch: 3, reason: "cut" } as const;
    expect(route(lost, "a", state())).toMatchObject({ action: "fault" });
    expect(route({ ...lost, epoch: 2 }, "a", state())).toEqual({ action: "ignore" });
    expect(route(lost, "a", state({ phase: "recovering" }))).toEqual({ action: "ignore" });
  });

  it("a worker ready while training and out of the ring is a joiner; at the start it answers the start", () => {
    const ready = { t: "ready", rank: 5, info } as const;
    expect(route(ready, "a", state())).toEqual({ action: "joiner", rank: 5 });
    expect(route(ready, "a", state({ phase: "starting" }))).toEqual({ action: "deliver", message: ready });
    // A rank this provider does not host is no joiner of its.
    expect(route(ready, "a", state({ hosts: () => false }))).toEqual({ action: "deliver", message: ready });
  });
});

describe("a provider's text, at the coordinator's one intake", () => {
  it("loses terminal control characters and is bounded before anything prints it", async () => {
    const { unpack } = await import("../../../src/job/coordinator/answers.js");
    const esc = "\u001b[2J\u001b]0;owned\u0007";
    const failed = unpack({ t: "failed", rank: 0, message: `boom${esc}`, where: `task.py${esc}`, kind: "task" }, "p");
    expect(failed).toMatchObject({ message: "boom\ufffd[2J\ufffd]0;owned\ufffd", where: "task.py\ufffd[2J\ufffd]0;owned\ufffd" });
    const log = unpack({ t: "log", line: `${"x".repeat(100_000)}${esc}` }, "p");
    expect(log.t === "log" && log.line.length).toBeLessThanOrEqual(16 * 1024);
    const welcome = unpack({ t: "welcome", version: 3, provider: { id: "a", hostname: `h${esc}`, python: "3", torch: "2", devices: [{ id: "cpu", kind: "cpu", name: `n${esc}` }] } }, "p");
    expect(welcome.t === "welcome" && [welcome.provider.hostname, welcome.provider.devices[0]!.name]).toEqual(["h\ufffd[2J\ufffd]0;owned\ufffd", "n\ufffd[2J\ufffd]0;owned\ufffd"]);
    expect(unpack({ t: "reject", reason: `no${esc}` }, "p")).toEqual({ t: "reject", reason: "no\ufffd[2J\ufffd]0;owned\ufffd" });
  });
});
