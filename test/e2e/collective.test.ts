import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { nimble, REPO_ROOT, type TempDir, useE2E } from "../helpers/processes.js";
import { maxWeightDifference } from "../helpers/safetensors.js";
import { mlpTask } from "../helpers/tasks.js";

const MNIST_TASK = path.join(REPO_ROOT, "examples", "mnist", "task.py");

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

async function train(name: string, body: string[], task = MNIST_TASK) {
  const file = path.join(tmp.dir, `${name}.yaml`);
  await writeFile(file, [`name: ${name}`, `task: ${task}`, `output: ${path.join(tmp.dir, "runs")}`, ...body].join("\n") + "\n");
  const result = await nimble(["train", file, "--json", "--python", python], { timeout: 480_000 });
  const events = String(result.stdout)
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l));
  const runDir = events.find((e) => e.type === "done")?.run_dir as string | undefined;
  const summary = runDir ? JSON.parse(await readFile(path.join(runDir, "summary.json"), "utf8")) : null;
  return { result, events, runDir, summary };
}

const BODY = ["steps: 12", "batch_size: 48", "optimizer: {name: sgd, lr: 0.05, momentum: 0.9}", "compression: {method: none}", "balance: equal", "eval: {samples: 200}", "local_workers: 3"];

describe("the direct all-reduce in a job", () => {
  it("3 providers, collective direct: replicas agree (hashes every 10 steps and at the end), summary.json records it, the weights are the ring's within float rounding", async () => {
    const direct = await train("direct-3", [...BODY, "collective: {algorithm: direct}"]);
    expect(direct.result.exitCode, String(direct.result.stderr)).toBe(0);
    const s = direct.summary;
    expect(s.status).toBe("completed");
    expect(s.steps).toBe(12);
    expect(s.collective).toMatchObject({ config: "direct", algorithm: "direct", members: 3 });
    // every step's gradient all-reduce ran direct, none on the ring
    expect(s.collective.observed.direct.count).toBeGreaterThanOrEqual(12);
    expect(s.collective.observed.ring.count).toBe(0);
    expect(s.collective.predicted_s.ring).toBeGreaterThan(0);
    expect(s.collective.predicted_s.direct).toBeGreaterThan(0);
    expect(s.collective.link.source).toBe("loopback");
    expect(s.collective.bytes).toBeGreaterThan(100_000);
    const line = direct.events.find((e) => e.type === "status" && /^Collective: direct/.test(e.message));
    expect(line?.message).toMatch(/predicted ring .* ms, direct .* ms/);

    const ring = await train("ring-3", [...BODY, "collective: {algorithm: ring}"]);
    expect(ring.result.exitCode, String(ring.result.stderr)).toBe(0);
    expect(ring.summary.collective).toMatchObject({ config: "ring", algorithm: "ring" });
    expect(ring.summary.collective.observed.ring.count).toBeGreaterThanOrEqual(12);
    expect(ring.summary.collective.observed.direct.count).toBe(0);
    // The same bytes per member: 2(N-1)/N of the gradient (plus N-2 more op frames per step).
    const perStep = (x: { bytes_sent: number; sync_bytes: number }) => (x.bytes_sent - x.sync_bytes) / 12;
    expect(perStep(s) / perStep(ring.summary)).toBeGreaterThan(0.999);
    expect(perStep(s) / perStep(ring.summary)).toBeLessThan(1.001);
    const { maxDiff, values } = await maxWeightDifference(direct.runDir!, ring.runDir!);
    expect(values).toBeGreaterThan(1000);
    expect(maxDiff).toBeLessThan(1e-4);
  }, 900_000);

  it("3 providers, collective auto: the choice and its inputs (measured links, both predictions) are in summary.json and the start-up lines", async () => {
    const auto = await train("auto-3", [...BODY.filter((l) => !l.startsWith("steps")), "steps: 6", "compression: {method: fp16}"].filter((l) => l !== "compression: {method: none}"));
    expect(auto.result.exitCode, String(auto.result.stderr)).toBe(0);
    const c = auto.summary.collective;
    expect(c.config).toBe("auto");
    expect(["ring", "direct"]).toContain(c.algorithm);
    expect(c.algorithm).toBe(c.predicted_s.direct < c.predicted_s.ring ? "direct" : "ring");
    expect(c.link.source).toBe("measured");
    expect(c.link.rtt_ms).toBeGreaterThan(0);
    expect(c.link.rate_bytes_per_s).toBeGreaterThan(0);
    expect(c.observed.ring.count + c.observed.direct.count).toBeGreaterThanOrEqual(6);
    expect(auto.events.some((e) => e.type === "status" && /^Collective: (ring|direct) for the gradient all-reduce/.test(e.message))).toBe(true);
  }, 600_000);

  it("collective direct survives a worker killed mid-step: the step is redone on re-formed pair links, the worker rejoins, replicas agree", async () => {
    const task = mlpTask(`
import signal
_calls = 0
def compute_loss(model, batch):
    global _calls
    _calls += 1
    time.sleep(0.6)  # time for the restarted worker to load and rejoin
    # once: a marker in the job folder (the worker's working directory, kept across restarts)
    if os.environ.get("NIMBLE_RANK") == "1" and _calls == 9 and not os.path.exists("killed-once"):
        open("killed-once", "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)
`);
    const file = path.join(tmp.dir, "direct-kill.py");
    await writeFile(file, task);
    const run = await train("direct-kill", [
      "steps: 40",
      "batch_size: 48",
      "optimizer: {name: sgd, lr: 0.2}",
      "compression: {method: powersgd, rank: 2, start_step: 2}",
      "eval: {samples: 128, batch_size: 64}",
      "faults: {heartbeat_s: 2}",
      "local_workers: 3",
      "collective: {algorithm: direct}",
    ], file);
    expect(run.result.exitCode, String(run.result.stderr)).toBe(0);
    const s = run.summary;
    expect(s).toMatchObject({ status: "completed", steps: 40 });
    expect(s.faults).toHaveLength(1);
    expect(s.faults[0]).toMatchObject({ kind: "worker died", ranks: [1] });
    expect(s.steps_redone).toHaveLength(1);
    const statuses = run.events.filter((e) => e.type === "status").map((e) => e.message as string);
    expect(statuses.some((m) => /^Rank 1 joined before step \d+ with rank 0's state/.test(m)), statuses.join("\n")).toBe(true);
    // Every all-reduce of the steps ran direct: 3 members, then 2 while rank 1 restarted, then 3 again.
    expect(s.collective.observed.ring.count).toBe(0);
    expect(s.collective.observed.direct.count).toBeGreaterThanOrEqual(40);
    expect(s.collective.members).toBe(3);
  }, 600_000);
});
