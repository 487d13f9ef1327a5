import { mkdir, readdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { execa, nimble, startProvider, type TempDir, useE2E } from "../helpers/processes.js";
import { tinyTask } from "../helpers/tasks.js";

/**
 * Cancelling a run (Ctrl-C, SIGTERM) must leave nothing behind: no provider started for it,
 * no Python worker, and a run directory that says what happened.
 */

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

const SLOW_TASK = tinyTask({
  val: 32,
  extra: `
def compute_loss(model, batch):
    time.sleep(0.02)
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)
`,
});

async function setup(name: string, extra: string[] = []): Promise<{ config: string; runs: string }> {
  const dir = path.join(tmp.dir, name);
  await mkdir(dir, { recursive: true });
  await writeFile(path.join(dir, "task.py"), SLOW_TASK);
  const runs = path.join(dir, "runs");
  const config = path.join(dir, "nimble.yaml");
  await writeFile(config, [`name: ${name}`, "task: task.py", "steps: 100000", "batch_size: 8", "eval: {samples: 16}", `output: ${runs}`, ...extra].join("\n") + "\n");
  return { config, runs };
}

interface Proc {
  pid: number;
  ppid: number;
  stat: string;
  args: string;
}

async function processes(): Promise<Proc[]> {
  const ps = await execa("ps", ["-eo", "pid=,ppid=,stat=,args="]);
  return String(ps.stdout)
    .split("\n")
    .map((line) => line.trim().match(/^(\d+)\s+(\d+)\s+(\S+)\s+(.*)$/))
    .filter((m): m is RegExpMatchArray => m !== null)
    .map((m) => ({ pid: Number(m[1]), ppid: Number(m[2]), stat: m[3], args: m[4] }));
}

/** Every live (not zombie) process below `root`. */
async function descendants(root: number): Promise<Proc[]> {
  const all = (await processes()).filter((p) => !p.stat.startsWith("Z"));
  const found: Proc[] = [];
  const frontier = [root];
  while (frontier.length) {
    const parent = frontier.pop()!;
    for (const p of all.filter((q) => q.ppid === parent)) {
      found.push(p);
      frontier.push(p.pid);
    }
  }
  return found;
}

/** Of the processes seen earlier, those still alive as the same program (pid reuse aside) and not zombies. */
async function stillAlive(seen: Proc[]): Promise<Proc[]> {
  const now = await processes();
  return seen.filter((s) => now.some((p) => p.pid === s.pid && p.args === s.args && !p.stat.startsWith("Z")));
}

async function waitUntilGone(seen: Proc[], timeoutMs: number): Promise<Proc[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const left = await stillAlive(seen);
    if (left.length === 0 || Date.now() > deadline) return left;
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Streams stdout JSON events; resolves `waitFor(type)` once one of that type has arrived. */
function watchEvents(child: ReturnType<typeof nimble>) {
  const events: { type: string; [k: string]: unknown }[] = [];
  const stderr: string[] = [];
  let waiters: (() => void)[] = [];
  let pending = "";
  child.stdout?.setEncoding("utf8");
  child.stdout?.on("data", (chunk: string) => {
    pending += chunk;
    const lines = pending.split("\n");
    pending = lines.pop() ?? "";
    for (const line of lines) {
      try {
        events.push(JSON.parse(line));
      } catch {
        // not an event
      }
    }
    for (const w of waiters) w();
    waiters = [];
  });
  child.stderr?.setEncoding("utf8");
  child.stderr?.on("data", (chunk: string) => stderr.push(chunk));
  let exited = false;
  void child.then(() => {
    exited = true;
    for (const w of waiters) w();
  });
  return {
    events,
    stderr,
    async waitFor(type: string, timeoutMs: number) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const found = events.find((e) => e.type === type);
        if (found) return found;
        if (exited) throw new Error(`process exited before a ${type} event: ${stderr.join("")}`);
        if (Date.now() > deadline) throw new Error(`no ${type} event within ${timeoutMs} ms: ${stderr.join("")}`);
        await new Promise<void>((resolve) => {
          waiters.push(resolve);
          setTimeout(resolve, 500);
        });
      }
    },
  };
}

async function exitWithin(child: ReturnType<typeof nimble>, ms: number) {
  const timeout = new Promise<"timeout">((r) => setTimeout(() => r("timeout"), ms).unref());
  return Promise.race([child, timeout]);
}

async function runSummary(runs: string) {
  const dirs = await readdir(runs);
  expect(dirs).toHaveLength(1);
  const dir = path.join(runs, dirs[0]);
  const summary = JSON.parse(await readFile(path.join(dir, "summary.json"), "utf8"));
  const metrics = (await readFile(path.join(dir, "metrics.jsonl"), "utf8")).split("\n").filter(Boolean).map((l) => JSON.parse(l));
  return { dir, summary, metrics };
}

describe("cancelling a run leaves nothing behind", () => {
  it.each([
    ["SIGINT to the train process", (pid: number) => process.kill(pid, "SIGINT")],
    // Ctrl-C in a terminal: the whole foreground process group gets SIGINT, local providers too.
    ["SIGINT to its process group (Ctrl-C)", (pid: number) => process.kill(-pid, "SIGINT")],
  ])("%s: stops after the step in flight, leaves a checkpoint to resume from, exits 130, no provider or worker left", async (label, signal) => {
    const { config, runs } = await setup(label.startsWith("SIGINT to its") ? "cancel-group" : "cancel");
    const child = nimble(["train", config, "--json", "--local", "2"], { env: { NIMBLE_PYTHON: python }, buffer: false });
    const watch = watchEvents(child);
    await watch.waitFor("step", 180_000);

    // What this run started: 2 `nimble provide` processes and one worker under each.
    const tree = await descendants(child.pid!);
    const providers = tree.filter((p) => p.args.includes(" provide "));
    // The Python workers themselves (each under two bwrap processes, whose command lines name it too).
    const workers = tree.filter((p) => p.args.includes("nimble_worker") && !p.args.startsWith("bwrap"));
    expect(providers, JSON.stringify(tree)).toHaveLength(2);
    expect(workers, JSON.stringify(tree)).toHaveLength(2);

    signal(child.pid!);
    const result = await exitWithin(child, 20_000);
    expect(result, "nimble train did not exit within 20 s of the signal").not.toBe("timeout");
    if (result === "timeout") return;
    expect({ code: result.exitCode, signal: result.signal }, watch.stderr.join("")).toEqual({ code: 130, signal: undefined });
    expect(watch.stderr.join("")).toMatch(/cancelled/i);

    const { dir, summary, metrics } = await runSummary(runs);
    expect(summary.status).toBe("cancelled");
    // The step in flight finished and a checkpoint of it was written, to resume from.
    const checkpoint = path.join(dir, "checkpoints", `step-${String(summary.steps).padStart(6, "0")}`);
    expect((await readdir(checkpoint)).sort()).toEqual(expect.arrayContaining(["manifest.json", "model.pt", "optimizer.pt"]));
    expect(watch.stderr.join("")).toContain(`nimble train --resume ${dir}`);
    expect(summary.steps).toBeGreaterThanOrEqual(1);
    expect(summary.steps).toBeLessThan(100000);
    expect(metrics.length).toBeGreaterThanOrEqual(1);
    expect(metrics[0]).toMatchObject({ step: 0, samples: 8 });
    // Every completed step was recorded; the summary agrees with the metrics.
    expect(metrics).toHaveLength(summary.steps);

    const left = await waitUntilGone([...providers, ...workers], 10_000);
    expect(left, `left running: ${JSON.stringify(left)}`).toEqual([]);
  }, 300_000);

  it("SIGTERM to a standalone `nimble provide` during a job: the provider exits and its worker is gone", async () => {
    const token = "cancel-test-token";
    const provider = await startProvider(python, token);
    const { config, runs } = await setup("provider-term", ["providers:", `  - {address: "${provider.address}", token: ${token}}`]);
    const train = nimble(["train", config, "--json"], { env: { NIMBLE_PYTHON: python }, buffer: false });
    const watch = watchEvents(train);
    await watch.waitFor("step", 180_000);

    const workers = (await descendants(provider.child.pid!)).filter((p) => p.args.includes("nimble_worker") && !p.args.startsWith("bwrap"));
    expect(workers).toHaveLength(1);

    provider.child.kill("SIGTERM");
    const providerExit = await exitWithin(provider.child, 15_000);
    expect(providerExit, "nimble provide did not exit within 15 s of SIGTERM").not.toBe("timeout");
    if (providerExit === "timeout") return;
    expect(providerExit.signal ?? null).toBeNull();
    expect(providerExit.exitCode).toBe(0);
    expect(await waitUntilGone(workers, 10_000)).toEqual([]);

    // The researcher's run notices and fails, naming the provider, with the steps so far kept.
    const trainExit = await exitWithin(train, 30_000);
    expect(trainExit, "nimble train did not exit after losing its provider").not.toBe("timeout");
    if (trainExit === "timeout") return;
    expect(trainExit.exitCode).not.toBe(0);
    expect(trainExit.exitCode).not.toBe(130);
    expect(watch.stderr.join("")).toContain(provider.address);
    const { summary, metrics } = await runSummary(runs);
    expect(summary.status).toBe("failed");
    expect(metrics.length).toBeGreaterThanOrEqual(1);
  }, 300_000);
});
