import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { defaultKeyFile, loadIdentity } from "../../src/identity/identity.js";
import { describe, expect, it } from "vitest";
import { nimble, REPO_ROOT, startProvider, type TempDir, useE2E } from "../helpers/processes.js";
import { maxWeightDifference, readSafetensors } from "../helpers/safetensors.js";

const MNIST_TASK = path.join(REPO_ROOT, "examples", "mnist", "task.py");

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

async function writeConfig(name: string, body: string): Promise<string> {
  const file = path.join(tmp.dir, `${name}.yaml`);
  await writeFile(file, `name: ${name}\ntask: ${MNIST_TASK}\noutput: ${path.join(tmp.dir, "runs")}\n${body}`);
  return file;
}

async function train(config: string, extra: string[] = []) {
  const result = await nimble(["train", config, "--json", "--python", python, ...extra], { timeout: 480_000 });
  const events = String(result.stdout)
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l));
  const done = events.find((e) => e.type === "done");
  return { result, events, runDir: done?.run_dir as string | undefined };
}

describe("nimble train, end to end with real providers and PyTorch workers", () => {
  it("trains MNIST on 3 local providers to >= 90% validation accuracy and writes the run directory", async () => {
    const config = await writeConfig(
      "mnist-3",
      [
        "steps: 150",
        "batch_size: 64",
        "optimizer: {name: adam, lr: 0.002}",
        "eval: {every: 75, samples: 1000, batch_size: 500}",
        "checkpoint: {every: 75, keep: 1}",
        "local_workers: 3",
      ].join("\n"),
    );
    const { result, events, runDir } = await train(config);
    expect(result.exitCode, String(result.stderr)).toBe(0);
    expect(runDir).toBeTruthy();
    const summary = JSON.parse(await readFile(path.join(runDir!, "summary.json"), "utf8"));
    expect(summary.status).toBe("completed");
    expect(summary.steps).toBe(150);
    expect(summary.samples).toBe(150 * 64);
    // Throughput counts time in steps only: start-up (providers, workers, loading) is left out.
    expect(summary.train_s).toBeGreaterThan(0);
    expect(summary.train_s).toBeLessThan(summary.wall_s);
    expect(summary.samples_per_s).toBeCloseTo(summary.samples / summary.train_s, 6);
    expect(summary.eval.accuracy).toBeGreaterThanOrEqual(0.9);
    expect(summary.workers).toHaveLength(3);
    expect(summary.workers.reduce((a: number, w: { samples: number }) => a + w.samples, 0)).toBe(150 * 64);
    // Each step's ring all-reduce sends 2(N-1)/N of the gradient per worker: bytes were counted.
    expect(summary.bytes_sent).toBeGreaterThan(0);
    const lines = (await readFile(path.join(runDir!, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l));
    expect(lines).toHaveLength(150);
    expect(lines[0]).toMatchObject({ step: 0, samples: 64 });
    for (const key of ["loss", "lr", "wall_s", "bytes_sent"]) expect(typeof lines[10][key]).toBe("number");
    expect(lines[149].eval.accuracy).toBe(summary.eval.accuracy);
    const weights = await readSafetensors(path.join(runDir!, "model.safetensors"));
    expect(weights.size).toBeGreaterThan(0);
    const ckpt = path.join(runDir!, "checkpoints", "step-000150");
    for (const f of ["model.pt", "optimizer.pt", "rng.pt", "data.json"]) await expect(readFile(path.join(ckpt, f))).resolves.toBeTruthy();
    expect(events.filter((e) => e.type === "step")).toHaveLength(150);
  }, 600_000);

  it("1 worker and 3 workers end with the same weights (max abs difference < 1e-4 after 20 SGD steps)", async () => {
    const body = ["steps: 20", "batch_size: 64", "optimizer: {name: sgd, lr: 0.05, momentum: 0.9}", "eval: {samples: 200}"];
    const one = await writeConfig("exact-1", [...body, "local_workers: 1"].join("\n"));
    const three = await writeConfig("exact-3", [...body, "local_workers: 3"].join("\n"));
    const a = await train(one);
    expect(a.result.exitCode, String(a.result.stderr)).toBe(0);
    const b = await train(three);
    expect(b.result.exitCode, String(b.result.stderr)).toBe(0);
    const { maxDiff, values } = await maxWeightDifference(a.runDir!, b.runDir!);
    expect(values).toBeGreaterThan(1000);
    expect(maxDiff).toBeLessThan(1e-4);
    // And the runs really trained (not a no-op that trivially matches).
    const lossA = JSON.parse(await readFile(path.join(a.runDir!, "summary.json"), "utf8")).final_loss;
    const first = JSON.parse((await readFile(path.join(a.runDir!, "metrics.jsonl"), "utf8")).split("\n")[0]).loss;
    expect(lossA).toBeLessThan(first);
  }, 600_000);

  it("trains across providers started with `nimble provide` and named in the config (one in token mode, one in key mode)", async () => {
    const p1 = await startProvider(python, "token-one");
    // Key mode: its own identity, admitting only the researcher's key; the config names its key.
    const researcher = await loadIdentity(defaultKeyFile(), { create: true });
    const p2 = await startProvider(python, "token-two", ["--key", path.join(tmp.dir, "p2.key"), "--allow", researcher.key]);
    expect(p2.key).not.toBe(researcher.key);
    const config = await writeConfig(
      "named-providers",
      [
        "steps: 5",
        "batch_size: 32",
        "eval: {samples: 100}",
        "providers:",
        `  - {address: "${p1.address.replace("wss://", "")}", token: token-one}`,
        `  - {address: "${p2.address}", key: "${p2.key}"}`,
      ].join("\n"),
    );
    const { result, runDir } = await train(config);
    expect(result.exitCode, String(result.stderr)).toBe(0);
    const summary = JSON.parse(await readFile(path.join(runDir!, "summary.json"), "utf8"));
    expect(summary.workers.map((w: { provider: string }) => w.provider).sort()).toHaveLength(2);
    expect(summary.steps).toBe(5);
    // The providers outlive the job and take the next one.
    expect(p1.child.exitCode).toBeNull();
    const again = await train(config);
    expect(again.result.exitCode, String(again.result.stderr)).toBe(0);
  }, 600_000);

  it("over providers with the --latency and --link-rate testing aids, trains the same weights, each step paying at least the control round trip", async () => {
    const body = ["steps: 6", "batch_size: 32", "balance: equal", "leave_out_slow: false", "optimizer: {name: sgd, lr: 0.05}", "compression: {method: none}", "eval: {samples: 100}"];
    const plain = [await startProvider(python, "plain-a"), await startProvider(python, "plain-b")];
    const slow = [await startProvider(python, "slow-a", ["--latency", "40", "--link-rate", "20Mbit"]), await startProvider(python, "slow-b", ["--latency", "40ms", "--link-rate", "20Mbit"])];
    const providers = (ps: Array<{ address: string }>, tokens: string[]) => ["providers:", ...ps.map((p, i) => `  - {address: "${p.address}", token: ${tokens[i]}}`)];
    const a = await train(await writeConfig("lat-0", [...body, ...providers(plain, ["plain-a", "plain-b"])].join("\n")));
    expect(a.result.exitCode, String(a.result.stderr)).toBe(0);
    const b = await train(await writeConfig("lat-40", [...body, ...providers(slow, ["slow-a", "slow-b"])].join("\n")));
    expect(b.result.exitCode, String(b.result.stderr)).toBe(0);
    // Delay changes when frames arrive, never what they carry.
    const { maxDiff, values } = await maxWeightDifference(a.runDir!, b.runDir!);
    expect(values).toBeGreaterThan(1000);
    expect(maxDiff).toBe(0);
    // Lower bounds only: every step waits for a message to the coordinator and back (2 x 40 ms)
    // plus the ring's 2(N-1) = 2 one-way delays.
    const steps = (await readFile(path.join(b.runDir!, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l));
    for (const m of steps.slice(1)) expect(m.step_s - (m.eval_s ?? 0)).toBeGreaterThanOrEqual(0.15); // 0.16, less timer rounding
  }, 600_000);
});
