import { describe, expect, it } from "vitest";
import { DEFAULT_LIMITS } from "../../../src/runtime/limits.js";
import { canUseSpare, type JobNeeds, type WorkerSetup } from "../../../src/job/provider/spareFit.js";

const setup: WorkerSetup = {
  python: "/env/bin/python",
  sandbox: "bwrap",
  readOnly: ["/env", "/usr/lib/python3.11"],
  devices: [],
  device: "cpu",
  limits: DEFAULT_LIMITS,
};
const spare = { ...setup, alive: true };
const job: JobNeeds = { ...setup, requirements: null };

describe("canUseSpare: may a job's worker be the provider's warm spare?", () => {
  it("takes a live spare made exactly as a cold start would be", () => {
    expect(canUseSpare(spare, job)).toEqual({ use: true });
    // The order of binds does not matter.
    expect(canUseSpare({ ...spare, readOnly: [...setup.readOnly].reverse() }, job)).toEqual({ use: true });
  });

  it("starts cold when there is no spare, or it has exited", () => {
    expect(canUseSpare(null, job)).toEqual({ use: false, why: "no warm worker is kept for this device" });
    expect(canUseSpare({ ...spare, alive: false }, job)).toEqual({ use: false, why: "the warm worker has exited" });
  });

  it("starts cold for a job with requirements of its own, naming the lock", () => {
    const v = canUseSpare(spare, { ...job, requirements: "0123456789abcdef0123" });
    expect(v).toEqual({ use: false, why: "the job brings requirements (lock 0123456789ab), which the warm worker's environment lacks" });
  });

  it("starts cold when the sandbox would differ: another bind, confinement, device or limit", () => {
    expect(canUseSpare(spare, { ...job, readOnly: [...setup.readOnly, "/cache/site-abc"] })).toEqual({
      use: false,
      why: "the job needs /cache/site-abc bound read-only, which the warm worker's sandbox lacks",
    });
    expect(canUseSpare(spare, { ...job, sandbox: "none", readOnly: [] })).toEqual({ use: false, why: "the job is unconfined, the warm worker confined" });
    expect(canUseSpare({ ...spare, device: "cuda:0", devices: ["/dev/nvidia0"] }, { ...job, device: "cuda:1", devices: ["/dev/nvidia1"] })).toEqual({
      use: false,
      why: "the job's worker runs on cuda:1, the warm worker on cuda:0",
    });
    expect(canUseSpare(spare, { ...job, limits: { ...DEFAULT_LIMITS, maxMemoryBytes: 2 ** 30 } })).toEqual({
      use: false,
      why: `the job's maxMemoryBytes is ${2 ** 30}, the warm worker's null`,
    });
  });

  it("starts cold under another interpreter", () => {
    expect(canUseSpare(spare, { ...job, python: "/other/bin/python" })).toEqual({ use: false, why: "the job runs /other/bin/python, the warm worker /env/bin/python" });
  });

  it("a spare with a bind the job does not need is still the same sandbox but for that read-only view: it is not used", () => {
    // Fewer binds for the job than the spare has would show the job more than a cold start: refuse.
    const v = canUseSpare({ ...spare, readOnly: [...setup.readOnly, "/extra"] }, job);
    expect(v.use).toBe(false);
  });
});
