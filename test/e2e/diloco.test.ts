/**
 * DiLoCo end to end (issue "Low-communication training"): local providers train with
 * `strategy: diloco` (2 fragments synced in turn, an overlapped all-reduce, alpha 0.5, int8
 * pseudo-gradients); metrics and summary show the rounds; a run stopped at a checkpoint and
 * resumed ends with the same weights as one that ran straight through (global weights,
 * outer optimizers, every rank's local weights, inner optimizer and codec memory); more
 * fragments than the model has top-level modules is a config error at its line.
 */
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { nimble, type TempDir, useE2E } from "../helpers/processes.js";
import { maxWeightDifference } from "../helpers/safetensors.js";
import { tinyTask } from "../helpers/tasks.js";

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

const MODEL = "torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))";
const STRATEGY = "strategy: {name: diloco, inner_steps: 4, fragments: 2, overlap_steps: 1, alpha: 0.5, codec: int8, outer_optimizer: {lr: 0.7, momentum: 0.9}}";

async function train(name: string, lines: string[], extra: string[] = []) {
  await writeFile(path.join(tmp.dir, "task.py"), tinyTask({ model: MODEL, train: 256, val: 64 }));
  const config = path.join(tmp.dir, `${name}.yaml`);
  const body = [`name: ${name}`, "task: task.py", "batch_size: 16", "balance: equal", "optimizer: {name: adam, lr: 0.01}", "eval: {every: 8, samples: 64}", `output: ${path.join(tmp.dir, "runs")}`, ...lines];
  await writeFile(config, body.join("\n") + "\n");
  const r = await nimble(["train", config, "--json", "--local", "2", "--python", python, ...extra], { timeout: 180_000 });
  const events = String(r.stdout).trim().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l));
  return { r, config, events, runDir: events.find((e) => e.type === "done")?.run_dir as string | undefined };
}

describe("diloco", () => {
  it("trains in rounds, shows them, and resumes from a checkpoint exactly", async () => {
    const whole = await train("whole", ["steps: 16", STRATEGY]);
    expect(whole.r.exitCode, String(whole.r.stderr)).toBe(0);
    const summary = JSON.parse(await readFile(path.join(whole.runDir!, "summary.json"), "utf8"));
    expect(summary).toMatchObject({ status: "completed", steps: 16, samples: 256, strategy: { name: "diloco", fragments: 2 } });
    expect(summary.diloco.rounds).toBe(8);
    expect(summary.diloco.hidden_fraction).toBeGreaterThanOrEqual(0);
    const lines = (await readFile(path.join(whole.runDir!, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l));
    expect(lines.map((l) => l.step)).toEqual([1, 3, 5, 7, 9, 11, 13, 15]);
    expect(lines.map((l) => l.diloco.fragment)).toEqual([0, 1, 0, 1, 0, 1, 0, 1]);
    expect(lines[0].diloco).toMatchObject({ round: 0, inner_steps: 2, outer_lr: 0.7 });
    // Bytes against DDP: half the model (one fragment) in int8 once per 2 steps, instead of the
    // whole gradient in float32 every step (16x before int8's block scales and the frames'
    // headers, which weigh much on a 114-parameter model).
    const sent = lines.reduce((a, l) => a + l.bytes_sent, 0);
    const ddp = lines.reduce((a, l) => a + l.uncompressed_bytes, 0);
    expect(ddp / sent).toBeGreaterThan(4);
    expect(whole.events.filter((e) => e.type === "eval").map((e) => e.step)).toEqual([8, 16]);
    // The report shows the rounds too.
    const report = await nimble(["report", whole.runDir!, "--json"], { timeout: 60_000 });
    const data = JSON.parse(String(report.stdout)).data;
    expect(data.figures.strategy).toMatch(/^diloco: H=4, 2 fragment\(s\), overlap 1, alpha 0.5, codec int8$/);
    expect(data.figures.diloco.rounds).toBe(8);
    expect(data.series.rounds.map((r: { fragment: number }) => r.fragment)).toEqual([0, 1, 0, 1, 0, 1, 0, 1]);

    // Stopped after 8 of 16 steps, then resumed: the same weights as straight through.
    const half = await train("half", ["steps: 8", "checkpoint: {every: 8}", STRATEGY]);
    expect(half.r.exitCode, String(half.r.stderr)).toBe(0);
    const resumed = await nimble(["train", "--resume", half.runDir!, "--set", "steps=16", "--json", "--local", "2", "--python", python], { timeout: 180_000 });
    expect(resumed.exitCode, String(resumed.stderr)).toBe(0);
    const { maxDiff, values } = await maxWeightDifference(whole.runDir!, half.runDir!);
    expect(values).toBe(4 * 16 + 16 + 16 * 2 + 2);
    expect(maxDiff).toBe(0);
  }, 600_000);

  it("refuses more fragments than the model's top-level modules, at the line that asks for them", async () => {
    const bad = await train("frag", ["steps: 8", STRATEGY.replace("fragments: 2, overlap_steps: 1", "fragments: 4")]);
    expect(bad.r.exitCode).toBe(2);
    expect(String(bad.r.stderr)).toMatch(/frag\.yaml:\d+:\d+: strategy\.fragments: 4 is more than the model's 2 top-level modules with trainable parameters \(0, 2\)/);
  }, 180_000);
});
