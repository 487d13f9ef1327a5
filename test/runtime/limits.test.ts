import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { memoryFault, sweepStaleCgroups } from "../../src/runtime/limits.js";

const root = mkdtempSync(path.join(tmpdir(), "nimble-cgroups-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

describe("worker cgroups", () => {
  it("the empty ones of providers that are gone are swept; a live provider's and others' stay", () => {
    mkdirSync(path.join(root, "pids"));
    const gone = path.join(root, "pids", "nimble-999999999-nimble-job-x-rank0-0");
    const live = path.join(root, "pids", `nimble-${process.ppid}-nimble-job-y-rank0-0`);
    const other = path.join(root, "pids", "docker-abc");
    for (const d of [gone, live, other]) mkdirSync(d);
    expect(sweepStaleCgroups(root)).toBe(1);
    expect([existsSync(gone), existsSync(live), existsSync(other)]).toEqual([false, true, true]);
  });

  it("name a memory fault with the limit and what was resident", () => {
    expect(memoryFault(1e9, 1.1e9)).toBe("went past the owner's memory limit (--max-memory 1.0 GB; resident 1.1 GB)");
    expect(memoryFault(2e9, null)).toBe("went past the owner's memory limit (--max-memory 2.0 GB)");
  });
});
