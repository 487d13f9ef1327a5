/**
 * A finished run (issue "Real training code"): `--resume` says so and changes nothing;
 * `--resume RUN --set steps=N` trains it further, to N steps, every step once.
 */
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { nimble, type TempDir, useE2E } from "../helpers/processes.js";
import { tinyTask } from "../helpers/tasks.js";

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

describe("resuming a finished run", () => {
  it("says so and changes nothing; with --set steps=N it trains on to N", async () => {
    await writeFile(path.join(tmp.dir, "task.py"), tinyTask({ train: 64, val: 16 }));
    const config = path.join(tmp.dir, "nimble.yaml");
    await writeFile(config, ["name: finished", "task: task.py", "steps: 4", "batch_size: 8", "compression: {method: none}", "checkpoint: {every: 2}", `output: ${path.join(tmp.dir, "runs")}`].join("\n") + "\n");
    const first = await nimble(["train", config, "--json", "--local", "1", "--python", python], { timeout: 120_000 });
    expect(first.exitCode, String(first.stderr)).toBe(0);
    const runDir = String(first.stdout).trim().split("\n").map((l) => JSON.parse(l)).find((e) => e.type === "done").run_dir as string;
    const summary = await readFile(path.join(runDir, "summary.json"), "utf8");
    const metrics = await readFile(path.join(runDir, "metrics.jsonl"), "utf8");

    const again = await nimble(["train", "--resume", runDir, "--python", python], { timeout: 60_000 });
    expect(again.exitCode, String(again.stderr)).toBe(0);
    expect(String(again.stdout)).toContain(`${runDir} is a finished run: all 4 of its 4 steps are done, so nothing was changed.`);
    expect(await readFile(path.join(runDir, "summary.json"), "utf8")).toBe(summary);
    expect(await readFile(path.join(runDir, "metrics.jsonl"), "utf8")).toBe(metrics);

    const longer = await nimble(["train", "--resume", runDir, "--set", "steps=7", "--json", "--local", "1", "--python", python], { timeout: 120_000 });
    expect(longer.exitCode, String(longer.stderr)).toBe(0);
    const extended = JSON.parse(await readFile(path.join(runDir, "summary.json"), "utf8"));
    expect(extended).toMatchObject({ status: "completed", steps: 7 });
    const steps = (await readFile(path.join(runDir, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l).step);
    expect(steps).toEqual([0, 1, 2, 3, 4, 5, 6]);
  }, 300_000);
});
