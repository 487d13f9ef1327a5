/**
 * A finished run (issue "Real training code"): `--resume` says so and changes nothing;
 * `--resume RUN --set steps=N` trains it further, to N steps, every step once.
 */
import { createHash } from "node:crypto";
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

    // nimble export: the weights (format pt) and a config.json naming what made them.
    const to = path.join(tmp.dir, "exported");
    const exp = await nimble(["export", runDir, "--to", to, "--json"]);
    expect(exp.exitCode, String(exp.stderr)).toBe(0);
    const made = JSON.parse(await readFile(path.join(to, "config.json"), "utf8"));
    const taskHash = createHash("sha256").update(await readFile(path.join(tmp.dir, "task.py"))).digest("hex");
    expect(made).toMatchObject({ format: "nimble-export-1", name: "finished", steps: 7, status: "completed", task: { task: "task.py", sha256: taskHash, package: false } });
    expect(made.job_config.steps).toBe(7); // the config as it applied: with --set steps=7
    const blob = await readFile(path.join(to, "model.safetensors"));
    const header = JSON.parse(blob.subarray(8, 8 + Number(blob.readBigUInt64LE(0))).toString("utf8"));
    expect(header.__metadata__).toMatchObject({ format: "pt", step: "7" });
    const twice = await nimble(["export", runDir, "--to", to]);
    expect(twice.exitCode).not.toBe(0);
    expect(String(twice.stderr)).toContain("already holds an export");
  }, 300_000);
});
