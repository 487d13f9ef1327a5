import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { TEST_COORDINATOR } from "../helpers/tls.js";
import { ProviderClient } from "../../src/job/providerClient.js";
import { nimble, REPO_ROOT, startProvider, type TempDir, useE2E } from "../helpers/processes.js";
import { maxWeightDifference } from "../helpers/safetensors.js";
import { tinyTask } from "../helpers/tasks.js";

const MNIST = path.join(REPO_ROOT, "examples", "mnist");

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

describe("nimble bench", () => {
  it("measures the host and the task's own throughput (--json)", async () => {
    const r = await nimble(["bench", path.join(MNIST, "nimble.yaml"), "--quick", "--json", "--python", python], { timeout: 180_000 });
    expect(r.exitCode, String(r.stderr)).toBe(0);
    const report = JSON.parse(String(r.stdout).trim().split("\n").pop()!);
    expect(report.host.devices.length).toBeGreaterThan(0);
    expect(report.host.matmul_gflops.fp32).toBeGreaterThan(0);
    expect(report.host.memory_gbps).toBeGreaterThan(0);
    const task = report.host.task;
    expect(Object.keys(task.samples_per_s).length).toBeGreaterThan(1);
    expect(task.samples_per_s[String(task.best_micro_batch)]).toBeGreaterThan(0);
    expect(task.max_micro_batch).toBeGreaterThanOrEqual(task.best_micro_batch);
  }, 240_000);

  it("measures the link to a provider over the training transport, and refuses a wrong token", async () => {
    const p = await startProvider(python, "bench-token");
    const ok = await nimble(["bench", "--quick", "--json", "--python", python, "--peer", p.address, "--token", "bench-token"], { timeout: 180_000 });
    expect(ok.exitCode, String(ok.stderr)).toBe(0);
    const [peer] = JSON.parse(String(ok.stdout).trim().split("\n").pop()!).peers;
    expect(peer.rtt_ms.samples).toBe(20);
    expect(peer.rtt_ms.median).toBeGreaterThan(0);
    expect(peer.upload_bytes_per_s).toBeGreaterThan(1e6);
    const bad = await nimble(["bench", "--quick", "--python", python, "--peer", p.address, "--token", "nope"], { timeout: 180_000 });
    expect(bad.exitCode).not.toBe(0);
    expect(String(bad.stderr)).toContain("refused the bench: wrong token");
  }, 300_000);
});

describe("provider profiles", () => {
  it("are measured once per set of devices, cached, and advertised to coordinators", async () => {
    const env = { ...process.env, NIMBLE_CACHE_DIR: path.join(tmp.dir, "cache") };
    const first = await startProvider(python, "profile-token", [], { profile: true, env });
    const client = await ProviderClient.connect(first.address.replace("wss://", ""), { identity: TEST_COORDINATOR, token: "profile-token" });
    const profile = client.info.profile!;
    client.close();
    expect(profile.matmul_gflops_fp32).toBeGreaterThan(0);
    first.child.kill("SIGTERM");
    await first.child;
    // The second start reuses the cached profile: the same measurement, not a new one.
    const second = await startProvider(python, "profile-token", [], { profile: true, env });
    const again = await ProviderClient.connect(second.address, { identity: TEST_COORDINATOR, token: "profile-token" });
    expect(again.info.profile).toEqual(profile);
    again.close();
  }, 300_000);
});

describe("capability-weighted shares, end to end", () => {
  it("gives slower providers smaller shares, and the uneven split trains the same model as one worker", async () => {
    const speeds = [1, 0.5, 0.25];
    const providers = await Promise.all(speeds.map((s, i) => startProvider(python, `speed-${i}`, ["--speed", String(s)])));
    const body = ["steps: 20", "batch_size: 96", "optimizer: {name: sgd, lr: 0.05, momentum: 0.9}", "compression: {method: none}", "eval: {samples: 100}"];
    const write = async (name: string, lines: string[]) => {
      const file = path.join(tmp.dir, `${name}.yaml`);
      await writeFile(file, [`name: ${name}`, `task: ${path.join(MNIST, "task.py")}`, `output: ${path.join(tmp.dir, "runs")}`, ...body, ...lines].join("\n") + "\n");
      return file;
    };
    const run = async (file: string) => {
      const r = await nimble(["train", file, "--json", "--python", python], { timeout: 300_000 });
      expect(r.exitCode, String(r.stderr)).toBe(0);
      return String(r.stdout)
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l))
        .find((e) => e.type === "done").run_dir as string;
    };
    const weighted = await run(
      await write("weighted", ["providers:", ...providers.map((p, i) => `  - {address: "${p.address}", token: speed-${i}}`)]),
    );
    const single = await run(await write("single", ["local_workers: 1"]));
    const lines = (await readFile(path.join(weighted, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l));
    const last = lines[lines.length - 1].workers.map((w: { share: number }) => w.share);
    expect(last.reduce((a: number, b: number) => a + b, 0)).toBe(96);
    // Shares follow the measured speeds: the full-speed provider gets the most, the slowest the least.
    expect(last[0]).toBeGreaterThan(last[1]);
    expect(last[1]).toBeGreaterThan(last[2]);
    expect((await maxWeightDifference(weighted, single)).maxDiff).toBeLessThan(1e-4);
  }, 600_000);
});

describe("leaving out a worker whose link would slow every step", () => {
  it("measures each host's link, leaves out the slow one with the figures behind it, and trains on exactly without it", async () => {
    // Slowed to a tenth of their speed, so that compute (not the ring) dominates a step between
    // the two fast hosts: else one worker alone would be faster still, and rightly chosen.
    const providers = [
      await startProvider(python, "link-0", ["--speed", "0.1"]),
      await startProvider(python, "link-1", ["--speed", "0.1"]),
      // About 2.4 Mbit/s: every all-reduce of this model's 280 KB of gradients waits on it.
      await startProvider(python, "link-2", ["--speed", "0.1", "--link-rate", "300kB"]),
    ];
    const taskFile = path.join(tmp.dir, "wide.py");
    await writeFile(
      taskFile,
      tinyTask({ features: 64, model: "torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 2))" }),
    );
    const write = async (name: string, lines: string[]) => {
      const file = path.join(tmp.dir, `${name}.yaml`);
      const body = ["steps: 12", "batch_size: 256", "optimizer: {name: sgd, lr: 0.1}", "compression: {method: none}", "eval: {samples: 64}"];
      await writeFile(file, [`name: ${name}`, `task: ${taskFile}`, `output: ${path.join(tmp.dir, "runs")}`, ...body, ...lines].join("\n") + "\n");
      return file;
    };
    const r = await nimble(
      ["train", await write("slow-link", ["providers:", ...providers.map((p, i) => `  - {address: "${p.address}", token: link-${i}}`)]), "--json", "--python", python],
      { timeout: 300_000 },
    );
    expect(r.exitCode, String(r.stderr)).toBe(0);
    const events = String(r.stdout).trim().split("\n").map((l) => JSON.parse(l));
    const summary = events.find((e) => e.type === "done").summary;
    // Links: the paced host uploads at about its rate, the others far faster.
    expect(summary.links).toHaveLength(3);
    const rate = (rank: number) => summary.links.find((l: { rank: number }) => l.rank === rank).upload_bytes_per_s;
    expect(rate(2)).toBeLessThan(450e3);
    expect(rate(0)).toBeGreaterThan(5e6);
    expect(rate(1)).toBeGreaterThan(5e6);
    // Rank 2 is left out after the first measured steps, and the message gives the figures.
    expect(summary.left_out).toHaveLength(1);
    expect(summary.left_out[0]).toMatchObject({ rank: 2, after_step: 2 });
    expect(summary.left_out[0].reason).toMatch(/its link \([0-9.]+ kB\/s\) would make every step's all-reduce take [0-9.]+ s against [0-9.]+ s of compute; leaving it out makes steps [0-9.]+x faster/);
    expect(events.some((e) => e.type === "status" && /^Leaving out worker rank 2/.test(e.message))).toBe(true);
    const lines = (await readFile(path.join(summary.run_dir, "metrics.jsonl"), "utf8")).trim().split("\n").map((l) => JSON.parse(l));
    expect(lines).toHaveLength(12);
    for (const line of lines.slice(3)) {
      expect(line.workers.map((w: { rank: number }) => w.rank)).toEqual([0, 1]);
      expect(line.workers.reduce((a: number, w: { share: number }) => a + w.share, 0)).toBe(256);
    }
    expect(lines[2].workers).toHaveLength(3);
    // Rank 2's samples are those of the steps before it was left out; rows say "left out".
    const rank2 = summary.workers.find((w: { rank: number }) => w.rank === 2);
    const before = lines.slice(0, 3).reduce((a: number, l: { workers: { rank: number; samples: number }[] }) => a + l.workers[2].samples, 0);
    expect(rank2.samples).toBe(before);
    const lastRows = events.filter((e) => e.type === "workers").at(-1).workers;
    expect(lastRows.map((w: { state: string }) => w.state)).toEqual(["done", "done", "left out"]);
    // The batch is still computed in full every step: the same model as one worker trains.
    const single = await nimble(["train", await write("slow-link-single", ["local_workers: 1"]), "--json", "--python", python], { timeout: 300_000 });
    expect(single.exitCode, String(single.stderr)).toBe(0);
    const singleDir = String(single.stdout).trim().split("\n").map((l) => JSON.parse(l)).find((e) => e.type === "done").run_dir;
    expect((await maxWeightDifference(summary.run_dir, singleDir)).maxDiff).toBeLessThan(1e-4);
  }, 600_000);
});
