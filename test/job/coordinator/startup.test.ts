import { describe, expect, it } from "vitest";
import { StartupClock, startupLine } from "../../../src/job/coordinator/startup.js";
import { probeFromEnv } from "../../../src/runtime/python.js";

describe("StartupClock: where the time to the first step went", () => {
  it("gives each phase the time since the previous mark, and freezes at the first step", () => {
    const clock = new StartupClock();
    clock.mark("config", 500);
    clock.mark("connect", 700);
    clock.mark("workers", 2700);
    clock.workers([{ rank: 1, warm: false, import_s: 1.5, load_s: 0.4 }, { rank: 0, warm: true, import_s: 0, load_s: 0.3 }]);
    const s = clock.finish(3000);
    expect(s).toEqual({
      first_step_s: 3,
      phases: { config: 0.5, connect: 0.2, workers: 2, first_step: 0.3 },
      workers: [{ rank: 0, warm: true, import_s: 0, load_s: 0.3 }, { rank: 1, warm: false, import_s: 1.5, load_s: 0.4 }],
    });
    // Steps after the first change nothing.
    clock.mark("sync", 9000);
    expect(clock.finish(9999)).toBe(s);
    expect(startupLine(s)).toBe("First step 3.00 s after start (config 0.50, connect 0.20, workers 2.00, first step 0.30); 1 of 2 workers warm");
  });
});

describe("probeFromEnv: a probe handed down to local providers", () => {
  const probe = { python: "3.11.7", torch: "2.13.0", devices: [{ id: "cpu", kind: "cpu", name: "Xeon" }] };
  it("reads a well-formed probe", () => {
    expect(probeFromEnv({ NIMBLE_HOST_PROBE: JSON.stringify(probe) })).toEqual({ ...probe, devices: [{ id: "cpu", kind: "cpu", name: "Xeon", memory_bytes: undefined, cores: undefined }] });
  });
  it("ignores an absent or malformed one (the provider then probes itself)", () => {
    expect(probeFromEnv({})).toBeUndefined();
    expect(probeFromEnv({ NIMBLE_HOST_PROBE: "{not json" })).toBeUndefined();
    expect(probeFromEnv({ NIMBLE_HOST_PROBE: JSON.stringify({ ...probe, devices: [] }) })).toBeUndefined();
  });
});
