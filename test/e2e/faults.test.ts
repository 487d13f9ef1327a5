import { execFileSync } from "node:child_process";
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { forEachLine } from "../../src/runtime/lines.js";
import { nimble, startProvider, type TempDir, useE2E } from "../helpers/processes.js";
import { maxWeightDifference } from "../helpers/safetensors.js";
import { mlpTask } from "../helpers/tasks.js";

// Chaos tests: real providers, workers and sockets; faults injected by killing, stopping and
// resuming processes. Each job must finish with replicas identical (the coordinator compares
// parameter hashes after every recovery and at the end), every step run exactly once to
// completion, and a validation loss close to a fault-free run of the same config.

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

const STEPS = 30;
const TASK = mlpTask(`
import signal
_calls = 0
# task_args.chaos (workers see only their own environment): slow_s, kill_rank, kill_at, once.
_chaos = {}
_build = build_model
def build_model(args):
    _chaos.update(args.get("chaos") or {})
    return _build(args)
def compute_loss(model, batch):
    global _calls
    _calls += 1
    time.sleep(float(_chaos.get("slow_s", 0)))  # time for a restart to rejoin
    kill_at = int(_chaos.get("kill_at", 9))
    if str(_chaos.get("kill_rank")) == os.environ.get("NIMBLE_RANK") and _calls == kill_at:
        # Once (a marker file in the job folder, kept across restarts, says it happened), or every time the worker starts.
        marker = _chaos.get("once")
        if not marker or not os.path.exists(marker):
            if marker:
                open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)
`);

async function writeConfig(name: string, lines: string[], faults = "faults: {heartbeat_s: 2}", strategy: string | null = null): Promise<string> {
  const dir = path.join(tmp.dir, name);
  await import("node:fs/promises").then((fs) => fs.mkdir(dir, { recursive: true }));
  await writeFile(path.join(dir, "task.py"), TASK);
  const file = path.join(dir, "nimble.yaml");
  const body = [
    `name: ${name}`,
    "task: task.py",
    `steps: ${STEPS}`,
    "batch_size: 48",
    "optimizer: {name: sgd, lr: 0.2, momentum: 0.9}",
    // Compressed from step 2: an abandoned step must also undo PowerSGD's memories and Q's.
    strategy ?? "compression: {method: powersgd, rank: 2, start_step: 2}",
    "eval: {samples: 128, batch_size: 64}",
    faults,
    `output: ${path.join(dir, "runs")}`,
  ];
  await writeFile(file, [...body, ...lines].join("\n") + "\n");
  return file;
}

type Event = { type: string; step?: number; message?: string; summary?: Record<string, unknown>; run_dir?: string };

/** `nimble train --json`, calling `onEvent` as events arrive (to inject faults mid-run). */
async function train(config: string, onEvent: (e: Event, child: ReturnType<typeof nimble>) => void = () => {}, env: NodeJS.ProcessEnv = {}, args: string[] = []) {
  const child = nimble(["train", ...(config ? [config] : []), ...args, "--json", "--python", python], {
    timeout: 300_000,
    buffer: { stdout: false, stderr: true },
    env: { ...process.env, ...env },
  });
  const events: { at: number; event: Event }[] = [];
  forEachLine(child.stdout!, (line) => {
    try {
      const event = JSON.parse(line) as Event;
      events.push({ at: Date.now(), event });
      onEvent(event, child);
    } catch {
      // not an event
    }
  });
  const result = await child;
  const done = events.find((e) => e.event.type === "done")?.event;
  return { result, events, summary: done?.summary as Record<string, any> | undefined, runDir: done?.run_dir };
}

/** A loopback port free now (for a provider started later at a known address). */
async function freePort(): Promise<number> {
  const { createServer } = await import("node:net");
  return new Promise((resolve) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const port = (server.address() as { port: number }).port;
      server.close(() => resolve(port));
    });
  });
}

async function metricsOf(runDir: string) {
  return (await readFile(path.join(runDir, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l));
}

/** Every step completed exactly once, in order: none lost, none applied twice. */
async function expectEveryStepOnce(runDir: string) {
  const lines = await metricsOf(runDir);
  expect(lines.map((l: { step: number }) => l.step)).toEqual([...Array(STEPS).keys()]);
  for (const l of lines) expect(l.workers.reduce((a: number, w: { samples: number }) => a + w.samples, 0)).toBe(48);
  return lines;
}

let reference: { loss: number } | null = null;
async function faultFreeLoss(): Promise<number> {
  if (reference) return reference.loss;
  const providers = await Promise.all([0, 1, 2].map((i) => startProvider(python, `ref-${i}`)));
  const r = await train(await writeConfig("reference", ["providers:", ...providers.map((p, i) => `  - {address: "${p.address}", token: ref-${i}}`)]));
  expect(r.result.exitCode, String(r.result.stderr)).toBe(0);
  for (const p of providers) p.child.kill("SIGTERM");
  reference = { loss: r.summary!.eval.loss };
  return reference.loss;
}

describe("fault tolerance, end to end", () => {
  it("survives kill -9 of a provider mid-run: the ring re-forms, the step is redone, the job finishes", async () => {
    const providers = await Promise.all([0, 1, 2].map((i) => startProvider(python, `kill-${i}`)));
    const config = await writeConfig("kill-provider", ["providers:", ...providers.map((p, i) => `  - {address: "${p.address}", token: kill-${i}}`)]);
    let killed = false;
    const r = await train(config, (e) => {
      if (e.type === "step" && e.step === 12 && !killed) {
        killed = true;
        providers[2].child.kill("SIGKILL");
      }
    });
    expect(r.result.exitCode, String(r.result.stderr)).toBe(0);
    const s = r.summary!;
    expect(s.status).toBe("completed");
    expect(s.steps).toBe(STEPS);
    // One fault: the neighbours' broken ring links are its echo, not faults of their own.
    expect(s.faults).toHaveLength(1);
    expect(s.faults[0]).toMatchObject({ kind: "provider lost", ranks: [2] });
    expect(s.faults[0].reason).toMatch(/closed the connection/);
    expect(s.steps_redone).toHaveLength(1);
    expect(s.faults[0].recovery_s).toBeGreaterThan(0);
    expect(s.workers.find((w: { rank: number }) => w.rank === 2).samples).toBeGreaterThan(0);
    const lines = await expectEveryStepOnce(r.runDir!);
    expect(lines.at(-1).workers.map((w: { rank: number }) => w.rank)).toEqual([0, 1]);
    expect(r.events.some((e) => e.event.type === "status" && /Ring re-formed with 2 workers \(ranks 0, 1\)/.test(e.event.message!))).toBe(true);
    const loss = s.eval.loss as number;
    expect(Math.abs(loss - (await faultFreeLoss()))).toBeLessThan(0.15);
  }, 600_000);

  it("survives a Python worker killed mid-step (SIGKILL): the others redo the step, the worker restarts and rejoins with a peer's state", async () => {
    const config = await writeConfig("kill-worker", ["local_workers: 3", "task_args: {chaos: {kill_rank: 1, once: killed-once, slow_s: 0.4}}"]);
    const r = await train(config);
    expect(r.result.exitCode, String(r.result.stderr)).toBe(0);
    const s = r.summary!;
    expect(s.faults).toHaveLength(1);
    expect(s.faults[0]).toMatchObject({ kind: "worker died", ranks: [1] });
    expect(s.faults[0].reason).toMatch(/worker for rank 1 on \S+ was killed by SIGKILL/);
    expect(s.steps_redone).toEqual([s.faults[0].step]);
    const lines = await expectEveryStepOnce(r.runDir!);
    // Restarted, rank 1 took rank 0's state over the ring and trained to the end.
    const joined = r.events.find((e) => e.event.type === "status" && /^Rank 1 joined before step (\d+) with rank 0's state/.test(e.event.message!));
    expect(joined, "rank 1 rejoined").toBeTruthy();
    expect(lines.at(-1).workers.map((w: { rank: number }) => w.rank)).toEqual([0, 1, 2]);
    expect(s.workers.map((w: { rank: number }) => w.rank)).toEqual([0, 1, 2]);
    const rows = r.events.filter((e) => e.event.type === "workers").at(-1)!.event as unknown as { workers: { state: string }[] };
    expect(rows.workers.map((w) => w.state)).toEqual(["done", "done", "done"]);
    expect(Math.abs((s.eval.loss as number) - (await faultFreeLoss()))).toBeLessThan(0.15);
  }, 600_000);

  it("diloco: a worker killed mid-round costs the survivors no inner steps: only the round's all-reduce is redone, then it rejoins", async () => {
    // 3 inner steps of 16 samples per worker per round; the kill comes in round 2's second step.
    const strategy = "strategy: {name: diloco, inner_steps: 6, fragments: 2, overlap_steps: 1, codec: int8}";
    const config = await writeConfig("diloco-kill", ["local_workers: 3", "balance: equal", "task_args: {chaos: {kill_rank: 1, kill_at: 8, once: killed-once, slow_s: 0.3}}"], "faults: {heartbeat_s: 2}", strategy);
    const r = await train(config);
    expect(r.result.exitCode, String(r.result.stderr)).toBe(0);
    const s = r.summary!;
    expect(s).toMatchObject({ status: "completed", steps: STEPS });
    expect(s.faults).toHaveLength(1);
    expect(s.faults[0]).toMatchObject({ kind: "worker died", ranks: [1] });
    expect(s.steps_redone).toEqual([6]);
    const lines = await metricsOf(r.runDir!);
    expect(lines.map((l: { step: number }) => l.step)).toEqual([2, 5, 8, 11, 14, 17, 20, 23, 26, 29]);
    // The round the fault struck: the survivors' shares as they were (rank 1's not handed out).
    const struck = lines.find((l: { step: number }) => l.step === 8);
    expect(struck.workers.map((w: { rank: number; samples: number }) => [w.rank, w.samples])).toEqual([[0, 48], [2, 48]]);
    const joined = r.events.find((e) => e.event.type === "status" && /^Rank 1 joined before step \d+ with rank 0's state/.test(e.event.message!));
    expect(joined, "rank 1 rejoined").toBeTruthy();
    expect(lines.at(-1).workers.map((w: { rank: number }) => w.rank)).toEqual([0, 1, 2]);
  }, 600_000);

  it("lets a worker that keeps crashing leave after faults.max_restarts, with the reason", async () => {
    const config = await writeConfig("crash-loop", ["local_workers: 2", "task_args: {chaos: {kill_rank: 1, kill_at: 4, slow_s: 0.4}}"], "faults: {heartbeat_s: 2, max_restarts: 1}");
    const r = await train(config);
    expect(r.result.exitCode, String(r.result.stderr)).toBe(0);
    await expectEveryStepOnce(r.runDir!);
    const faults = r.summary!.faults as { kind: string; ranks: number[]; reason: string }[];
    expect(faults.map((f) => [f.kind, f.ranks]), JSON.stringify(faults)).toEqual([
      ["worker died", [1]],
      ["worker died", [1]],
    ]);
    expect(faults[1].reason, JSON.stringify(r.events.filter((e) => e.event.type === "status").map((e) => e.event.message))).toMatch(/worker for rank 1 on \S+ was killed by SIGKILL; it crashed 2 times \(faults\.max_restarts is 1\), so it leaves the job/);
    expect(r.summary!.workers[1]).toMatchObject({ rank: 1 });
    const rows = r.events.filter((e) => e.event.type === "workers").at(-1)!.event as unknown as { workers: { state: string }[] };
    expect(rows.workers.map((w) => w.state)).toEqual(["done", "lost"]);
  }, 600_000);

  it("takes in a provider that comes up mid-run (optional in the config): it joins with a peer's state and gets a share", async () => {
    const providers = await Promise.all([0, 1].map((i) => startProvider(python, `join-${i}`)));
    const port = await freePort();
    const config = await writeConfig("join", [
      "task_args: {chaos: {slow_s: 0.4}}",
      "providers:",
      ...providers.map((p, i) => `  - {address: "${p.address}", token: join-${i}}`),
      `  - {address: "127.0.0.1:${port}", token: join-2, optional: true}`,
    ]);
    let started = false;
    const r = await train(config, (e) => {
      if (e.type === "step" && e.step === 2 && !started) {
        started = true;
        void startProvider(python, "join-2", ["--port", String(port)]);
      }
    });
    expect(r.result.exitCode, String(r.result.stderr)).toBe(0);
    const statuses = r.events.filter((e) => e.event.type === "status").map((e) => e.event.message!);
    expect(statuses.some((m) => m.startsWith(`Optional provider 127.0.0.1:${port} is not reachable`))).toBe(true);
    const joined = statuses.find((m) => /^Rank 2 joined before step \d+ with rank 0's state; 3 workers/.test(m));
    expect(joined).toBeTruthy();
    const lines = await expectEveryStepOnce(r.runDir!);
    expect(lines[0].workers.map((w: { rank: number }) => w.rank)).toEqual([0, 1]);
    expect(lines.at(-1).workers.map((w: { rank: number }) => w.rank)).toEqual([0, 1, 2]);
    expect(lines.at(-1).workers[2].samples).toBeGreaterThan(0);
    expect(Math.abs((r.summary!.eval.loss as number) - (await faultFreeLoss()))).toBeLessThan(0.15);
  }, 600_000);

  it("detects a provider paused with SIGSTOP within the heartbeat deadline, goes on without it, and the provider recovers when resumed", async () => {
    const providers = await Promise.all([0, 1, 2].map((i) => startProvider(python, `stop-${i}`)));
    const config = await writeConfig("stop-provider", ["providers:", ...providers.map((p, i) => `  - {address: "${p.address}", token: stop-${i}}`)]);
    let stoppedAt = 0;
    const pid = providers[1].child.pid!;
    const r = await train(config, (e) => {
      if (e.type === "step" && e.step === 10 && !stoppedAt) {
        stoppedAt = Date.now();
        process.kill(pid, "SIGSTOP");
        setTimeout(() => process.kill(pid, "SIGCONT"), 6000);
      }
    });
    expect(r.result.exitCode, String(r.result.stderr)).toBe(0);
    const s = r.summary!;
    const lost = s.faults.find((f: { kind: string }) => f.kind === "provider lost");
    expect(lost).toMatchObject({ ranks: [1] });
    expect(lost.reason).toMatch(/no heartbeat for [0-9.]+ s/);
    // Detected within the deadline (heartbeat_s: 2) plus one ping interval and scheduling slack.
    const noticed = r.events.find((e) => e.event.type === "status" && /^Fault: provider lost/.test(e.event.message!))!.at;
    expect(noticed - stoppedAt).toBeLessThan(6000);
    await expectEveryStepOnce(r.runDir!);
    // Resumed, the provider finds its job gone and takes a new one.
    await new Promise((resolve) => setTimeout(resolve, 7000 - Math.min(7000, Date.now() - stoppedAt)));
    const again = await train(await writeConfig("after-resume", ["providers:", `  - {address: "${providers[1].address}", token: stop-1}`]));
    expect(again.result.exitCode, String(again.result.stderr)).toBe(0);
  }, 600_000);
});

describe("resuming after the coordinator dies", () => {
  it("kill -9 of `nimble train`, then `nimble train --resume RUN_DIR`: the same curve, every step once, the same weights", async () => {
    const providers = await Promise.all([0, 1].map((i) => startProvider(python, `resume-${i}`)));
    const list = ["providers:", ...providers.map((p, i) => `  - {address: "${p.address}", token: resume-${i}}`)];
    // Equal shares: the resumed run splits every batch as the uninterrupted one does.
    const lines = [...list, "balance: equal", "checkpoint: {every: 5, keep: 2}"];
    const config = await writeConfig("resume", lines);
    let runDir = "";
    const first = await train(config, (e, child) => {
      if (e.type === "status" && /run directory (\S+)$/.test(e.message ?? "")) runDir = /run directory (\S+)$/.exec(e.message!)![1];
      if (e.type === "checkpoint" && e.step === 15) child.kill("SIGKILL");
    });
    expect(first.result.signal).toBe("SIGKILL");
    expect(runDir).not.toBe("");
    // A checkpoint cut short (no manifest) and a damaged one are passed over, naming why.
    const ckpts = path.join(runDir, "checkpoints");
    const { cp, rm: remove, writeFile: write } = await import("node:fs/promises");
    await cp(path.join(ckpts, "step-000015"), path.join(ckpts, "step-000020"), { recursive: true });
    await remove(path.join(ckpts, "step-000020", "manifest.json"));
    await write(path.join(ckpts, "step-000015", "optimizer.pt"), "truncated");
    const again = await train("", () => {}, {}, ["--resume", runDir]);
    expect(again.result.exitCode, String(again.result.stderr)).toBe(0);
    const statuses = again.events.filter((e) => e.event.type === "status").map((e) => e.event.message!);
    expect(statuses).toContain("Passing over checkpoint step-000020: it has no manifest (written only partly?)");
    expect(statuses.find((m) => m.startsWith("Passing over checkpoint step-000015"))).toMatch(/optimizer\.pt has 9 bytes, the manifest says \d+/);
    expect(statuses.some((m) => m.startsWith("Resuming") && m.includes("from step 10"))).toBe(true);
    await expectEveryStepOnce(runDir);
    // The same weights as a run that was never interrupted.
    const steady = await train(await writeConfig("resume-steady", lines));
    expect(steady.result.exitCode, String(steady.result.stderr)).toBe(0);
    expect((await maxWeightDifference(runDir, steady.runDir!)).maxDiff).toBeLessThan(1e-5);
  }, 600_000);
});

describe("a connection cut between live providers", () => {
  it("re-forms the ring with the same members when one ring link is severed (ss -K), and redoes the step", async () => {
    const providers = await Promise.all([0, 1, 2].map((i) => startProvider(python, `sever-${i}`)));
    const config = await writeConfig("sever", ["providers:", ...providers.map((p, i) => `  - {address: "${p.address}", token: sever-${i}}`)]);
    const port1 = new URL(providers[1].address).port;
    let cut = "";
    const r = await train(config, (e) => {
      if (e.type === "step" && e.step === 10 && !cut) {
        // Provider 0's ring link to provider 1 (rank 0 -> rank 1): its TCP connection from
        // provider 0's process to provider 1's port, aborted by the kernel.
        const lines = execFileSync("ss", ["-tnpH", "state", "established", "dport", "=", `:${port1}`], { encoding: "utf8" }).split("\n");
        const mine = lines.find((l) => l.includes(`pid=${providers[0].child.pid},`));
        const local = mine?.trim().split(/\s+/)[2];
        if (!local) return;
        cut = local;
        execFileSync("ss", ["-K", "src", local, "dst", `127.0.0.1:${port1}`]);
      }
    });
    expect(cut, "found provider 0's ring connection to provider 1").not.toBe("");
    expect(r.result.exitCode, String(r.result.stderr)).toBe(0);
    const s = r.summary!;
    expect(s.faults).toHaveLength(1);
    expect(s.faults[0]).toMatchObject({ kind: "ring broken", ranks: [] });
    expect(s.steps_redone).toHaveLength(1);
    await expectEveryStepOnce(r.runDir!);
    const statuses = r.events.filter((e) => e.event.type === "status").map((e) => e.event.message!);
    expect(statuses.some((m) => /^Ring re-formed with 3 workers \(ranks 0, 1, 2\)/.test(m))).toBe(true);
    expect(Math.abs((s.eval.loss as number) - (await faultFreeLoss()))).toBeLessThan(0.15);
  }, 600_000);
});
