import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ProviderClient } from "../../src/job/providerClient.js";
import { nimble, REPO_ROOT, startProvider, tempDir, testPython } from "../helpers/processes.js";
import { readSafetensors } from "../helpers/safetensors.js";

const MNIST = path.join(REPO_ROOT, "examples", "mnist");

let python = "";
let tmp: Awaited<ReturnType<typeof tempDir>>;
beforeAll(async () => {
  python = await testPython();
  tmp = await tempDir();
}, 600_000);
afterAll(() => tmp?.remove());

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
    const client = await ProviderClient.connect(first.address.replace("ws://", ""), "profile-token");
    const profile = client.info.profile!;
    client.close();
    expect(profile.matmul_gflops_fp32).toBeGreaterThan(0);
    first.child.kill("SIGTERM");
    await first.child;
    // The second start reuses the cached profile: the same measurement, not a new one.
    const second = await startProvider(python, "profile-token", [], { profile: true, env });
    const again = await ProviderClient.connect(second.address, "profile-token");
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
    const a = await readSafetensors(path.join(weighted, "model.safetensors"));
    const b = await readSafetensors(path.join(single, "model.safetensors"));
    let maxDiff = 0;
    for (const [name, t] of a) {
      const u = b.get(name)!;
      for (let i = 0; i < t.data.length; i++) maxDiff = Math.max(maxDiff, Math.abs(t.data[i] - u.data[i]));
    }
    expect(maxDiff).toBeLessThan(1e-4);
  }, 600_000);
});
