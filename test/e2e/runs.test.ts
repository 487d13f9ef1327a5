/**
 * What a researcher sees around a run, end to end: `--quiet` output in a pipe, the run's
 * train.log with every provider's prefixed output, and `nimble runs` / `runs show`.
 */
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { nimble, REPO_ROOT, type TempDir, useE2E } from "../helpers/processes.js";

const MNIST_TASK = path.join(REPO_ROOT, "examples", "mnist", "task.py");

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

describe("a run as the researcher sees it", () => {
  it("--quiet prints only the summary; train.log keeps every line; nimble runs lists and shows the run", async () => {
    const runsDir = path.join(tmp.dir, "runs");
    const config = path.join(tmp.dir, "quiet.yaml");
    await writeFile(
      config,
      [`name: quiet-mnist`, `task: ${MNIST_TASK}`, `output: ${runsDir}`, "steps: 12", "batch_size: 32", "eval: {every: 6, samples: 200}", "checkpoint: {every: 6, keep: 2}", "local_workers: 2"].join("\n"),
    );
    // Not a terminal (a pipe): the plain fallback, here at its quietest.
    const result = await nimble(["train", config, "--quiet", "--python", python], { timeout: 300_000 });
    expect(result.exitCode, String(result.stderr)).toBe(0);
    const out = String(result.stdout).trim().split("\n");
    expect(out[0]).toMatch(/^done in \S+: 12 steps, 384 samples \(\S+ samples\/s while training\)$/);
    expect(out.some((l) => /^step \d/.test(l) || l.startsWith("Starting") || l.startsWith("["))).toBe(false);
    const runDir = /run dir (.+)$/.exec(out.at(-1)!)?.[1];
    expect(runDir).toBeTruthy();

    const log = (await readFile(path.join(runDir!, "train.log"), "utf8")).trimEnd().split("\n");
    for (const line of log) expect(line).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z /);
    // From before the run directory existed: starting the local providers, and their own output.
    expect(log[0]).toMatch(/Starting 2 local providers/);
    expect(log.some((l) => / \[wss:\/\/127\.0\.0\.1:\d+\] /.test(l))).toBe(true);
    expect(log.filter((l) => / step +\d+\/12 /.test(l))).toHaveLength(12);
    expect(log.some((l) => l.includes("eval @ step 12:"))).toBe(true);
    expect(log.at(-1)).toMatch(/ {2}run dir /);

    const list = await nimble(["runs", "--output", runsDir]);
    expect(list.exitCode, String(list.stderr)).toBe(0);
    const row = String(list.stdout).split("\n").find((l) => l.startsWith(path.basename(runDir!)));
    expect(row).toMatch(/\scompleted\s.*\s12\s/);
    const json = JSON.parse(String((await nimble(["runs", "--output", runsDir, "--json"])).stdout));
    expect(json).toHaveLength(1);
    expect(json[0]).toMatchObject({ name: "quiet-mnist", status: "completed", figures: { steps: 12, samples: 384, workers: 2 }, checkpoints: [6, 12] });

    const show = await nimble(["runs", "show", "quiet-mnist", "--output", runsDir]);
    expect(show.exitCode, String(show.stderr)).toBe(0);
    expect(String(show.stdout)).toMatch(/samples\s+384/);
    expect(String(show.stdout)).toContain("checkpoints step 6, step 12");
    expect(String(show.stdout)).toContain("train.log");

    const missing = await nimble(["runs", "show", "gpt-9", "--output", runsDir]);
    expect(missing.exitCode).toBe(2);
    expect(String(missing.stderr)).toMatch(/error: No run gpt-9/);
  }, 400_000);
});
