import { describe, expect, it } from "vitest";
import { FaultError, JobFailed } from "../../../src/job/coordinator/errors.js";
import { Exchanges } from "../../../src/job/coordinator/exchanges.js";

const done = (rank: number, step: number) =>
  ({ t: "step_done", rank, step, loss: 1, samples: 1, lr: 0.1, compute_s: 0, comm_s: 0, skipped: false, micro_batches: 1, max_micro_batch: null, bytes_sent: 0, uncompressed_bytes: 0 }) as const;
const fault = () => new FaultError({ kind: "ring broken", ranks: [], reason: "cut", at: 0 });

describe("exchanges", () => {
  it("keeps several in flight, each collecting its own messages", async () => {
    const x = new Exchanges();
    const s0 = x.expect("step_done", "step 0", [0, 1], 1_000, (m) => m.step === 0);
    const s1 = x.expect("step_done", "step 1", [0, 1], 1_000, (m) => m.step === 1);
    expect(x.inFlight).toBe(2);
    x.deliver(done(1, 1));
    x.deliver(done(0, 0));
    x.deliver(done(2, 0)); // not asked of rank 2
    x.deliver(done(0, 1));
    expect([...(await s1).keys()].sort()).toEqual([0, 1]);
    expect(x.inFlight).toBe(1);
    x.deliver(done(1, 0));
    expect((await s0).get(1)!.step).toBe(0);
    expect(x.inFlight).toBe(0);
  });

  it("a fault interrupts every exchange in flight, or the next one opened", async () => {
    const x = new Exchanges();
    const a = x.expect("step_done", "a", [0], 1_000);
    const b = x.expect("synced", "b", [0], 1_000);
    x.interrupt(fault());
    await expect(a).rejects.toBeInstanceOf(FaultError);
    await expect(b).rejects.toBeInstanceOf(FaultError);
    x.interrupt(fault());
    await expect(x.expect("synced", "c", [0], 1_000)).rejects.toBeInstanceOf(FaultError);
    // ...once: the one after goes through.
    const d = x.expect("synced", "d", [0], 1_000);
    x.deliver({ t: "synced", rank: 0, hash: "h", bytes_sent: 0 });
    expect((await d).size).toBe(1);
    x.interrupt(fault());
    x.clearInterrupt();
    const e = x.expect("synced", "e", [], 1_000);
    expect((await e).size).toBe(0);
  });

  it("fails every exchange, now and later, and times out naming the missing ranks", async () => {
    const x = new Exchanges();
    const late = x.expect("step_done", "step 3", [0, 4], 20);
    x.deliver(done(0, 3));
    await expect(late).rejects.toThrow("Timed out after 0.02 s waiting for step 3 from rank(s) 4");
    const a = x.expect("synced", "a", [0], 1_000);
    x.fail(new JobFailed("boom"));
    await expect(a).rejects.toThrow("boom");
    await expect(x.expect("synced", "b", [0], 1_000)).rejects.toThrow("boom");
  });
});
