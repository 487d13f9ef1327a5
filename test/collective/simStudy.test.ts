import { describe, expect, it } from "vitest";
import { missReason, modelLink, NO_SOFTWARE_COSTS, studyCell } from "../../src/collective/simStudy.js";

const MiB = 1024 * 1024;
const gbit10 = { alphaS: 0.005, betaSPerByte: 8 / 10e9 };

describe("modelLink", () => {
  it("a CPU slower per byte than the uplink paces the bytes; hop is a send and a receive", () => {
    const sw = { sendMessageS: 10e-6, recvMessageS: 30e-6, sendSPerByte: 1e-9, recvSPerByte: 2e-9 };
    const link = modelLink(gbit10, sw);
    expect(link.alphaS).toBe(0.005);
    expect(link.betaSPerByte).toBeCloseTo(3e-9, 18);
    expect(link.hopS).toBeCloseTo(40e-6, 15);
    expect(modelLink({ alphaS: 0, betaSPerByte: 1e-6 }, sw).betaSPerByte).toBe(1e-6);
  });
});

describe("studyCell", () => {
  it("without software costs the best is within 2x of the bound, and the model's pick is close to it", () => {
    for (const [n, bytes] of [
      [16, 1024],
      [16, 16 * MiB],
      [12, 4 * MiB],
    ]) {
      const c = studyCell(n, bytes, { alphaS: 0.05, betaSPerByte: 8 / 100e6 }, NO_SOFTWARE_COSTS);
      expect(c.ratio, `n=${n} bytes=${bytes}`).toBeLessThanOrEqual(2);
      expect(c.miss).toBeNull();
      expect(c.regret).toBeLessThan(1.2);
      expect(Object.keys(c.simS).sort()).toEqual(["direct", "halving_doubling", "ring", "two_level"]);
    }
  });

  it("names a CPU slower than a 10 Gbit/s uplink as the reason for a miss", () => {
    const sw = { sendMessageS: 0, recvMessageS: 0, sendSPerByte: 3e-9, recvSPerByte: 5e-9 };
    const c = studyCell(8, 64 * MiB, gbit10, sw);
    expect(c.ratio).toBeGreaterThan(2);
    expect(c.miss).toBe("per-byte CPU");
    expect(c.ratioWithoutSoftware).toBeLessThanOrEqual(2);
  });

  it("names per-message software costs at large n and small buffers", () => {
    // A CPU slower per byte than the link too, but the buffer is small: messages are what cost.
    const sw = { sendMessageS: 1e-3, recvMessageS: 1e-3, sendSPerByte: 1e-8, recvSPerByte: 1e-8 };
    const c = studyCell(64, 1024, { alphaS: 0.001, betaSPerByte: 8 / 1e9 }, sw);
    expect(c.miss).toBe("per-message CPU");
  });
});

describe("missReason", () => {
  it("latency or bandwidth when even the bare network misses", () => {
    expect(missReason(3, 3, { alphaS: 0.05, betaSPerByte: 1e-9 }, 1024, 1024)).toBe("latency");
    expect(missReason(3, 3, { alphaS: 1e-6, betaSPerByte: 1e-6 }, 6, 64 * MiB)).toBe("bandwidth");
    expect(missReason(1.5, 1, gbit10, 6, 64 * MiB)).toBe("per-message CPU");
    expect(missReason(3, 1, gbit10, 6, 64 * MiB)).toBe("per-byte CPU");
  });
});
