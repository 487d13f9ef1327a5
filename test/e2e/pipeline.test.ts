/**
 * Pipeline parallelism end to end (issue "Model parallelism"): real providers, workers,
 * sockets and PyTorch. An nn.Sequential MLP trained 20 SGD steps by one worker with
 * `pipeline_stages: 1` (the reference every layout must match), then split 2x1 (GPipe),
 * 2x2 and 3x1 (1F1B): the same weights within 1e-4, under the unsplit model's names; a
 * checkpoint of every stage that resumes exactly; a provider killed mid-run with and without
 * a replica of its stage.
 */
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { nimble, startProvider, type TempDir, useE2E } from "../helpers/processes.js";
import { maxWeightDifference, readSafetensors } from "../helpers/safetensors.js";
import { tinyTask } from "../helpers/tasks.js";

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

// Five top-level layers; a sleep in the last layer's forward (task_args.slow_s) keeps steps long enough to kill mid-step.
const TASK = tinyTask({
  features: 8,
  model: "torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), Slow(16, 2, float(args.get('slow_s', 0))))",
  train: 320,
  val: 64,
  extra: `
class Slow(torch.nn.Linear):
    def __init__(self, a, b, slow_s):
        super().__init__(a, b)
        self.slow_s = slow_s
    def forward(self, x):
        time.sleep(self.slow_s)
        return super().forward(x)
`,
});

const BASE = ["steps: 20", "batch_size: 16", "seed: 3", "compression: {method: none}", "optimizer: {name: sgd, lr: 0.2, momentum: 0.5}", "grad_clip: 0.5", "eval: {every: 10, samples: 64, batch_size: 32}"];

async function train(name: string, lines: string[], extra: string[] = [], onEvent?: (e: Record<string, unknown>) => void) {
  const dir = path.join(tmp.dir, name);
  await import("node:fs/promises").then((fs) => fs.mkdir(dir, { recursive: true }));
  await writeFile(path.join(dir, "task.py"), TASK);
  const config = path.join(dir, "nimble.yaml");
  await writeFile(config, [`name: ${name}`, "task: task.py", `output: ${path.join(dir, "runs")}`, ...BASE, ...lines].join("\n") + "\n");
  const child = nimble(["train", config, "--json", "--python", python, ...extra], { timeout: 300_000, buffer: { stdout: true, stderr: true } });
  const events: Record<string, unknown>[] = [];
  let rest = "";
  child.stdout?.on("data", (chunk: Buffer) => {
    const lines = (rest + chunk.toString()).split("\n");
    rest = lines.pop() ?? "";
    for (const l of lines) {
      if (!l.startsWith("{")) continue;
      const e = JSON.parse(l) as Record<string, unknown>;
      events.push(e);
      onEvent?.(e);
    }
  });
  const result = await child;
  const done = events.find((e) => e.type === "done") as { run_dir: string } | undefined;
  return { result, events, runDir: done?.run_dir, config };
}

const summaryOf = async (runDir: string) => JSON.parse(await readFile(path.join(runDir, "summary.json"), "utf8"));

let reference = "";

describe("pipeline parallelism", () => {
  it("one worker with pipeline_stages 1 is the reference; 2x1 (GPipe) matches it, names and checkpoints included", async () => {
    const one = await train("pp-1x1", ["local_workers: 1", "parallel: {pipeline_stages: 1, micro_batches: 4}"]);
    expect(one.result.exitCode, String(one.result.stderr)).toBe(0);
    reference = one.runDir!;
    const two = await train("pp-2x1", ["local_workers: 2", "parallel: {pipeline_stages: 2, micro_batches: 4, schedule: gpipe}", "checkpoint: {every: 10}"]);
    expect(two.result.exitCode, String(two.result.stderr)).toBe(0);
    const { maxDiff, values } = await maxWeightDifference(reference, two.runDir!);
    expect(values).toBe(8 * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2);
    expect(maxDiff).toBeLessThan(1e-4);
    const names = [...(await readSafetensors(path.join(two.runDir!, "model.safetensors"))).keys()].sort();
    expect(names).toEqual(["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]);
    const s = await summaryOf(two.runDir!);
    expect(s.pipeline.plan.bounds).toHaveLength(3);
    expect(s.pipeline.timeline.workers).toHaveLength(2);
    expect(s.pipeline.stages.map((x: { stage: number }) => x.stage).sort()).toEqual([0, 1]);
    // The losses match the reference's step by step.
    const r = await summaryOf(reference);
    expect(Math.abs(s.final_loss - r.final_loss)).toBeLessThan(1e-4);
    // The checkpoint holds every stage and resumes exactly: a run resumed from step 10 ends with the same weights.
    const resumed = await nimble(["train", "--resume", two.runDir!, "--json", "--python", python], { timeout: 300_000 });
    expect(resumed.exitCode, String(resumed.stderr)).toBe(0);
    expect((await maxWeightDifference(reference, two.runDir!)).maxDiff).toBeLessThan(1e-4);
  }, 600_000);

  it("2x2 and 3x1 (1F1B) match the reference", async () => {
    expect(reference).not.toBe("");
    for (const [name, workers, stages] of [["pp-2x2", 4, 2], ["pp-3x1", 3, 3]] as const) {
      const run = await train(name, [`local_workers: ${workers}`, `parallel: {pipeline_stages: ${stages}, micro_batches: 4, schedule: 1f1b}`]);
      expect(run.result.exitCode, String(run.result.stderr)).toBe(0);
      expect((await maxWeightDifference(reference, run.runDir!)).maxDiff, name).toBeLessThan(1e-4);
    }
  }, 600_000);

  it("a stage's provider killed mid-step with a replica left: its micro-batches are rerouted, the job ends with the reference's weights", async () => {
    expect(reference).not.toBe("");
    const providers = await Promise.all([0, 1, 2, 3].map((i) => startProvider(python, `pp-kill-${i}`)));
    try {
      let killed = false;
      const run = await train(
        "pp-kill-replica",
        ["providers:", ...providers.map((p, i) => `  - {address: "${p.address}", token: pp-kill-${i}}`), "parallel: {pipeline_stages: 2, micro_batches: 4}", "faults: {heartbeat_s: 2}", "task_args: {slow_s: 0.05}"],
        [],
        (e) => {
          if (e.type === "step" && e.step === 8 && !killed) {
            killed = true;
            providers[3].child.kill("SIGKILL"); // rank 3: stage 1 of chain 1
          }
        },
      );
      expect(run.result.exitCode, String(run.result.stderr)).toBe(0);
      const s = await summaryOf(run.runDir!);
      expect(s.faults).toHaveLength(1);
      expect(s.faults[0]).toMatchObject({ kind: "provider lost", ranks: [3] });
      expect(s.steps_redone.length).toBeLessThanOrEqual(1);
      // Rank 2, the other replica of stage 1, now serves both chains.
      expect(s.pipeline.stages.find((x: { rank: number }) => x.rank === 2).chains).toEqual([0, 1]);
      const steps = (await readFile(path.join(run.runDir!, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l).step);
      expect(steps).toEqual([...Array(20).keys()]);
      // Rerouting changes who computes, not what: the same weights as one worker's.
      expect((await maxWeightDifference(reference, run.runDir!)).maxDiff).toBeLessThan(1e-4);
    } finally {
      for (const p of providers) p.child.kill("SIGTERM");
    }
  }, 600_000);

  it("bad input: config errors with their line and exit 2, before any provider starts", async () => {
    const notSequential = `import torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 2)
    def forward(self, x):
        return self.a(x)
def build_model(args):
    return Net()
def build_dataset(split, args):
    return torch.utils.data.TensorDataset(torch.randn(32, 8), torch.zeros(32, dtype=torch.long))
`;
    const cases: [string, string[], RegExp, string?][] = [
      ["pp-odd", ["local_workers: 3", "parallel: {pipeline_stages: 2}"], /pipeline_stages: 2 does not divide the 3 workers/],
      ["pp-many", ["local_workers: 6", "parallel: {pipeline_stages: 6, micro_batches: 2}"], /6 pipeline stages but the model has only 5 top-level layers/],
      ["pp-notseq", ["local_workers: 2", "parallel: {pipeline_stages: 2}"], /not an nn.Sequential; define build_stages/, notSequential],
    ];
    for (const [name, lines, message, task] of cases) {
      const dir = path.join(tmp.dir, name);
      await import("node:fs/promises").then((fs) => fs.mkdir(dir, { recursive: true }));
      await writeFile(path.join(dir, "task.py"), task ?? TASK);
      const config = path.join(dir, "nimble.yaml");
      await writeFile(config, [`name: ${name}`, "task: task.py", `output: ${path.join(dir, "runs")}`, ...BASE, ...lines].join("\n") + "\n");
      const r = await nimble(["train", config, "--python", python], { timeout: 120_000 });
      expect(r.exitCode, `${name}: ${String(r.stderr)}`).toBe(2);
      const lineOf = BASE.length + lines.length + 3; // the parallel line
      expect(String(r.stderr)).toMatch(new RegExp(`nimble\\.yaml:${lineOf}:\\d+: parallel\\.pipeline_stages`));
      expect(String(r.stderr)).toMatch(message);
      expect(String(r.stderr)).not.toMatch(/Starting \d+ local provider/);
    }
  }, 300_000);

  it("a model no provider can hold alone (--max-memory) is refused as one stage and trains as two", async () => {
    const big = tinyTask({
      features: 2048,
      model: "torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(2048, 2048), torch.nn.Tanh())], torch.nn.Linear(2048, 2))",
      train: 64,
      val: 16,
    });
    const providers = await Promise.all([0, 1].map((i) => startProvider(python, `pp-mem-${i}`, ["--max-memory", "500MB"])));
    try {
      const dir = path.join(tmp.dir, "pp-mem");
      await import("node:fs/promises").then((fs) => fs.mkdir(dir, { recursive: true }));
      await writeFile(path.join(dir, "task.py"), big);
      const write = async (file: string, stages: number, n: number) => {
        const lines = ["name: pp-mem", "task: task.py", `output: ${path.join(dir, "runs")}`, "steps: 6", "batch_size: 8", "optimizer: {name: sgd, lr: 0.01, momentum: 0.9}"];
        lines.push("providers:", ...providers.slice(0, n).map((p, i) => `  - {address: "${p.address}", token: pp-mem-${i}}`), `parallel: {pipeline_stages: ${stages}, micro_batches: 2}`);
        await writeFile(path.join(dir, file), lines.join("\n") + "\n");
        return path.join(dir, file);
      };
      const alone = await nimble(["train", await write("one.yaml", 1, 1), "--python", python], { timeout: 120_000 });
      expect(alone.exitCode, String(alone.stderr)).toBe(2);
      expect(String(alone.stderr)).toMatch(/stage 0 needs at least [\d.]+ MB \(layers 0-8\), its providers allow 500 MB/);
      const split = await nimble(["train", await write("two.yaml", 2, 2), "--json", "--python", python], { timeout: 300_000 });
      expect(split.exitCode, String(split.stderr)).toBe(0);
      const done = String(split.stdout).split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l)).find((e) => e.type === "done");
      const s = await summaryOf(done.run_dir);
      expect(s.steps).toBe(6);
      expect(s.faults).toEqual([]);
      for (const stage of s.pipeline.plan.stages) expect(stage.memoryBytes).toBeLessThanOrEqual(500 * 1e6);
    } finally {
      for (const p of providers) p.child.kill("SIGTERM");
    }
  }, 600_000);

  it("a sole holder's provider killed mid-step: its replacement takes the stage from the peer that mirrored it, and the run ends with the reference's weights", async () => {
    expect(reference).not.toBe("");
    const providers = await Promise.all([0, 1].map((i) => startProvider(python, `pp-sole-${i}`)));
    const port = Number(new URL(providers[1].address).port);
    let back: Awaited<ReturnType<typeof startProvider>> | null = null;
    try {
      let killed = false;
      const run = await train(
        "pp-sole",
        ["providers:", ...providers.map((p, i) => `  - {address: "${p.address}", token: pp-sole-${i}}`), "parallel: {pipeline_stages: 2, micro_batches: 4}", "checkpoint: {every: 10}", "faults: {heartbeat_s: 2, wait_s: 90}", "task_args: {slow_s: 0.05}"],
        [],
        (e) => {
          if (e.type === "step" && e.step === 14 && !killed) {
            killed = true;
            providers[1].child.kill("SIGKILL"); // rank 1, the only holder of stage 1
            setTimeout(() => void startProvider(python, "pp-sole-1", ["--port", String(port)]).then((p) => (back = p)), 1500);
          }
        },
      );
      expect(run.result.exitCode, String(run.result.stderr)).toBe(0);
      const statuses = run.events.filter((e) => e.type === "status").map((e) => String(e.message));
      expect(statuses.some((m) => /Stage 1 \(rank 1, from rank 0's provider\) taken over with the state mirrored at step 10/.test(m)), statuses.join("\n")).toBe(true);
      const s = await summaryOf(run.runDir!);
      expect(s.rolled_back_to).toEqual([10]);
      const steps = (await readFile(path.join(run.runDir!, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l).step);
      expect(steps).toEqual([...Array(20).keys()]);
      expect((await maxWeightDifference(reference, run.runDir!)).maxDiff).toBeLessThan(1e-4);
    } finally {
      for (const p of [...providers, back]) (p as { child: { kill: (s: string) => void } } | null)?.child.kill("SIGTERM");
    }
  }, 600_000);
});
