import { mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { nimble, type TempDir, useE2E } from "../helpers/processes.js";
import { maxWeightDifference } from "../helpers/safetensors.js";
import { mlpTask } from "../helpers/tasks.js";

// Orders ahead (README, "Orders ahead"): real local providers, workers and sockets. With
// step t+1 ordered before t's reports are in, a worker applies t before its decision; a
// worker killed mid-step then aborts the round in flight and the one ordered ahead. The
// run must end with the same weights, bit for bit, as the same run without orders ahead.

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

const STEPS = 24;
const KILL_AT = 14; // rank 2 dies in its 14th forward pass: always in step 13
const TASK = mlpTask(`
import signal
_calls = 0
def compute_loss(model, batch):
    global _calls
    _calls += 1
    if os.environ.get("NIMBLE_RANK") == "2" and _calls == ${KILL_AT}:
        os.kill(os.getpid(), signal.SIGKILL)
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)
`);

async function run(name: string, ahead: "on" | "off") {
  const dir = path.join(tmp.dir, name);
  await mkdir(dir, { recursive: true });
  await writeFile(path.join(dir, "task.py"), TASK);
  const config = path.join(dir, "nimble.yaml");
  await writeFile(
    config,
    [
      `name: ${name}`,
      "task: task.py",
      `steps: ${STEPS}`,
      "batch_size: 48",
      "optimizer: {name: adam, lr: 0.01}",
      `strategy: {name: sync, orders_ahead: ${ahead}}`,
      // Fixed shares, so that both runs split every step the same way.
      "balance: equal",
      "local_workers: 3",
      "eval: {every: 0, samples: 64, batch_size: 64}",
      "faults: {heartbeat_s: 2, max_restarts: 0}",
      `output: ${path.join(dir, "runs")}`,
    ].join("\n") + "\n",
  );
  const child = nimble(["train", config, "--json", "--python", python], { timeout: 240_000 });
  const result = await child;
  const lines = String(result.stdout).trim().split("\n").flatMap((l) => {
    try {
      return [JSON.parse(l)];
    } catch {
      return [];
    }
  });
  const done = lines.find((e) => e.type === "done");
  expect(result.exitCode, String(result.stderr)).toBe(0);
  const metrics = (await readFile(path.join(done.run_dir, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l));
  return { summary: done.summary, runDir: done.run_dir as string, metrics };
}

describe("orders ahead, end to end", () => {
  it("a worker killed mid-step: the rounds in flight are aborted and redone, and the weights equal a run without orders ahead", async () => {
    const [ahead, inTurn] = [await run("ahead", "on"), await run("in-turn", "off")];
    for (const r of [ahead, inTurn]) {
      expect(r.metrics.map((m: { step: number }) => m.step)).toEqual([...Array(STEPS).keys()]);
      expect(r.summary.faults.length).toBeGreaterThan(0);
      expect(r.summary.steps_redone).toContain(KILL_AT - 1);
    }
    expect(ahead.summary.orders_ahead).toMatchObject({ mode: "on", from_step: 0 });
    expect(inTurn.summary.orders_ahead).toBeUndefined();
    const { maxDiff, values } = await maxWeightDifference(ahead.runDir, inTurn.runDir);
    expect(values).toBeGreaterThan(0);
    expect(maxDiff).toBe(0);
  }, 300_000);
});
