import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { RUN_LOG, RunLogReporter } from "../../src/ui/runLog.js";
import { stepEvent } from "./fixtures.js";

let dir = "";
afterEach(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe("RunLogReporter (train.log)", () => {
  it("keeps lines from before the run directory existed, then every event, each stamped and with its source", async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), "nimble-runlog-"));
    let t = Date.parse("2026-11-26T10:00:00.000Z");
    const log = new RunLogReporter({ now: () => new Date((t += 1000)) });
    log.handle({ type: "status", message: "Starting 2 local providers" });
    log.handle({ type: "log", source: "local-1", line: "nimble provider listening on ws://127.0.0.1:1" });
    log.handle({ type: "run", run_dir: dir, resumed: false });
    log.handle({ type: "status", message: "Step 3: shares 30 : 34", level: "debug" });
    for (let i = 1; i <= 3; i++) log.handle(stepEvent(i, 3));
    log.handle({ type: "log", source: "127.0.0.1:7071", line: "rank 1: loading task" });
    log.handle({ type: "error", message: "boom" });
    log.close();
    const lines = (await readFile(path.join(dir, RUN_LOG), "utf8")).trimEnd().split("\n");
    expect(lines[0]).toBe("2026-11-26T10:00:01.000Z Starting 2 local providers");
    expect(lines[1]).toBe("2026-11-26T10:00:02.000Z [local-1] nimble provider listening on ws://127.0.0.1:1");
    expect(lines[2]).toMatch(/^2026-11-26T10:00:03.000Z run directory /);
    const text = lines.join("\n");
    // Everything, whatever the terminal's verbosity: debug lines and every step.
    expect(text).toContain("Step 3: shares 30 : 34");
    expect(lines.filter((l) => / step [123]\/3 /.test(l))).toHaveLength(3);
    expect(text).toContain("[127.0.0.1:7071] rank 1: loading task");
    expect(lines.at(-1)).toMatch(/Z error: boom$/);
  });
});
