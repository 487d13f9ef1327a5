import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { forEachLine } from "../../src/runtime/lines.js";
import { nimble, startProvider, type TempDir, useE2E } from "../helpers/processes.js";
import { maxWeightDifference } from "../helpers/safetensors.js";
import { tinyTask } from "../helpers/tasks.js";

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

type Event = { type: string; [key: string]: any };

async function providerWithEvents(token: string, extra: string[] = []) {
  const p = await startProvider(python, token, extra);
  const events: Event[] = [];
  forEachLine(p.child.stdout, (line) => events.push(JSON.parse(line)));
  return { ...p, token, events };
}

async function until(what: string, ok: () => boolean, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// The job's own variables and folder reach a worker started before it: the task checks them.
const TASK = tinyTask({
  train: 128,
  val: 32,
  extra: [
    "assert os.environ.get('NIMBLE_WORLD_SIZE') == '1', dict(os.environ)",
    "assert os.path.dirname(os.path.dirname(os.path.abspath(__file__))) == os.getcwd(), (__file__, os.getcwd())",
  ].join("\n"),
});

async function train(name: string, provider: { address: string; token: string }) {
  const config = path.join(tmp.dir, `${name}.yaml`);
  const body = [`name: ${name}`, "task: task.py", "steps: 5", "batch_size: 32", "seed: 3", "optimizer: {name: sgd, lr: 0.1, momentum: 0.9}", "eval: {samples: 32}", `output: ${path.join(tmp.dir, "runs")}`];
  await writeFile(config, [...body, "providers:", `  - {address: "${provider.address}", token: ${provider.token}}`].join("\n") + "\n");
  const run = await nimble(["train", config, "--json", "--python", python], { timeout: 120_000 });
  expect(run.exitCode, String(run.stderr)).toBe(0);
  const events: Event[] = String(run.stdout).trim().split("\n").map((l) => JSON.parse(l));
  const runDir = events.find((e) => e.type === "done")!.run_dir as string;
  const summary = JSON.parse(await readFile(path.join(runDir, "summary.json"), "utf8"));
  return { events, runDir, summary, lines: events.filter((e) => e.type === "log" || e.type === "status").map((e) => String(e.line ?? e.message)) };
}

describe("a warm provider: a worker started ahead of the job, torch imported", () => {
  it("hands its spare to a job, starts a fresh one for the next, and trains exactly as a cold start does", async () => {
    await writeFile(path.join(tmp.dir, "task.py"), TASK);
    const [warm, cold] = await Promise.all([providerWithEvents("warm-a"), providerWithEvents("cold-a", ["--no-warm"])]);
    const spares = (state: string) => warm.events.filter((e) => e.type === "spare" && e.state === state);
    // (Events before `listening`, such as the first spare's `starting`, came before these were collected.)
    await until("the warm worker", () => spares("ready").length === 1);
    expect(warm.listening.warm).toBe(true);
    expect(cold.listening.warm).toBe(false);
    expect(warm.events.some((e) => e.type === "log" && /a warm worker is ready for the next job on cpu/.test(e.line))).toBe(true);

    // The cold reference runs beside the first warm job (its own provider), to keep the test short.
    const [first, reference] = await Promise.all([train("warm-1", warm), train("cold", cold)]);
    expect(first.summary.startup.workers).toEqual([expect.objectContaining({ rank: 0, warm: true, import_s: 0 })]);
    expect(first.lines.some((l) => /rank 0: using the warm worker/.test(l))).toBe(true);
    expect(first.lines.some((l) => /^First step .* 1 of 1 worker warm$/.test(l))).toBe(true);

    // The job took it; its end starts another, which the next job takes.
    await until("a fresh spare", () => spares("starting").length === 1);
    const second = await train("warm-2", warm);
    expect(second.summary.startup.workers).toEqual([expect.objectContaining({ rank: 0, warm: true })]);
    expect(spares("taken")).toHaveLength(2);

    expect(reference.summary.startup.workers).toEqual([expect.objectContaining({ rank: 0, warm: false })]);
    expect(reference.summary.startup.workers[0].import_s).toBeGreaterThan(0);
    for (const run of [first, second]) {
      expect(run.summary.steps).toBe(5);
      const { maxDiff, values } = await maxWeightDifference(run.runDir, reference.runDir);
      expect(values).toBeGreaterThan(0);
      expect(maxDiff).toBe(0);
    }
    await until("the third spare", () => spares("starting").length === 2);
  }, 240_000);
});
