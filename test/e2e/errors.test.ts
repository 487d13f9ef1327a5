import { readdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { ephemeralIdentity } from "../../src/identity/identity.js";
import { nimble, startProvider, type TempDir, useE2E } from "../helpers/processes.js";
import { tinyTask } from "../helpers/tasks.js";

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

const TINY_TASK = tinyTask();

async function setup(name: string, task: string, extraConfig: string[] = [], steps = 6): Promise<string> {
  const dir = path.join(tmp.dir, name);
  await import("node:fs/promises").then((fs) => fs.mkdir(dir, { recursive: true }));
  await writeFile(path.join(dir, "task.py"), task);
  const config = path.join(dir, "nimble.yaml");
  await writeFile(config, [`name: ${name}`, "task: task.py", `steps: ${steps}`, "batch_size: 16", "eval: {samples: 32}", `output: ${path.join(dir, "runs")}`, ...extraConfig].join("\n") + "\n");
  return config;
}

describe("nimble train: bad input gets a clear message and a non-zero exit", () => {
  it("names an unreachable provider", async () => {
    const config = await setup("unreachable", TINY_TASK, ["providers:", "  - {address: 127.0.0.1:9, token: x}"]);
    const r = await nimble(["train", config, "--python", python], { timeout: 60_000 });
    expect(r.exitCode).not.toBe(0);
    expect(String(r.stderr)).toMatch(/Cannot reach provider 127\.0\.0\.1:9/);
    expect(String(r.stderr)).toMatch(/hint:/);
  });

  it("reports a wrong token", async () => {
    const p = await startProvider(python, "the-right-token");
    const config = await setup("token", TINY_TASK, ["providers:", `  - {address: "${p.address}", token: not-the-token}`]);
    const r = await nimble(["train", config, "--python", python], { timeout: 60_000 });
    expect(r.exitCode).not.toBe(0);
    expect(String(r.stderr)).toContain("refused the job: wrong token");
  });

  it("key mode: a provider that does not admit your key, and a provider whose certificate is not the key named", async () => {
    const stranger = ephemeralIdentity();
    const p = await startProvider(python, "unused", ["--key", path.join(tmp.dir, "keyed.key"), "--allow", stranger.key]);
    const refused = await nimble(["train", await setup("not-allowed", TINY_TASK, ["providers:", `  - {address: "${p.address}", key: "${p.key}"}`]), "--python", python], { timeout: 60_000 });
    expect(refused.exitCode).not.toBe(0);
    expect(String(refused.stderr)).toContain("refused the job: key not allowed");
    expect(String(refused.stderr)).toMatch(/hint: Ask its owner to --allow your key ed25519:/);
    const t = await startProvider(python, "right-token");
    const config = await setup("wrong-key", TINY_TASK, ["providers:", `  - {address: "${t.address}", key: "${stranger.key}", token: right-token}`]);
    const wrong = await nimble(["train", config, "--python", python], { timeout: 60_000 });
    expect(wrong.exitCode).not.toBe(0);
    expect(String(wrong.stderr)).toMatch(/Refused provider .*: its certificate's key .* is not the expected .* \(a different host, or someone in between\)/);
  });

  it("names the task file and the missing function", async () => {
    const config = await setup("nofn", TINY_TASK.replace("def build_model", "def build_modle"));
    const r = await nimble(["train", config, "--python", python, "--local", "2"], { timeout: 120_000 });
    expect(r.exitCode).toBe(3); // a task error: 3 (config errors exit 2)
    expect(String(r.stderr)).toMatch(/task\.py/);
    expect(String(r.stderr)).toMatch(/build_model/);
    // Once, with its hint: not again on stdout, nor as a worker's log line.
    const told = (text: string) => text.split("\n").filter((l) => /task\.py: (build_model|import)/.test(l)).length;
    expect(told(String(r.stderr))).toBe(1);
    expect(told(String(r.stdout))).toBe(0);
    // --json: the error event says it is the task's, and where.
    const j = await nimble(["train", config, "--json", "--python", python, "--local", "1"], { timeout: 120_000 });
    expect(j.exitCode).toBe(3);
    const error = String(j.stdout).trim().split("\n").map((l) => JSON.parse(l)).find((e) => e.type === "error");
    expect(error).toMatchObject({ kind: "task", where: "task.py: build_model" });
    // The run folder it started is marked failed.
    const runs = path.join(path.dirname(config), "runs");
    for (const dir of await readdir(runs)) {
      expect(JSON.parse(await readFile(path.join(runs, dir, "summary.json"), "utf8")).status).toBe("failed");
    }
  }, 180_000);

  it("fails when a worker dies and too few are left (faults.min_workers), naming its rank, and keeps the metrics so far", async () => {
    const dying = `${TINY_TASK}
import signal
_calls = 0
def compute_loss(model, batch):
    global _calls
    _calls += 1
    if os.environ.get("NIMBLE_RANK") == "1" and _calls == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)
`;
    // No restarts, and a short wait for providers to come back: then the job stops.
    const config = await setup("dies", dying, ["faults: {min_workers: 2, max_restarts: 0, wait_s: 2}"]);
    const r = await nimble(["train", config, "--python", python, "--local", "2"], { timeout: 120_000 });
    expect(r.exitCode).not.toBe(0);
    expect(String(r.stderr)).toMatch(/1 worker left after worker died \(worker for rank 1 on \S+ was killed by SIGKILL.*\), and no provider came back within 2 s; faults\.min_workers is 2/);
    const runDir = /so far are in (\S+)\./.exec(String(r.stderr))?.[1];
    expect(runDir).toBeTruthy();
    const { readFile } = await import("node:fs/promises");
    const metrics = (await readFile(path.join(runDir!, "metrics.jsonl"), "utf8")).trim().split("\n");
    expect(metrics).toHaveLength(3); // steps 0-2 completed before rank 1 died in step 3
    const summary = JSON.parse(await readFile(path.join(runDir!, "summary.json"), "utf8"));
    expect(summary).toMatchObject({ status: "failed", steps: 3 });
  }, 180_000);

  it("fails loudly when replicas diverge, at the next parameter-hash check", async () => {
    // Rank 1 nudges its own weights outside the optimizer: its replica no longer matches.
    const drifting = `${TINY_TASK}
_calls = 0
def compute_loss(model, batch):
    global _calls
    _calls += 1
    if os.environ.get("NIMBLE_RANK") == "1" and _calls == 3:
        with torch.no_grad():
            model.weight[0, 0] += 1e-3
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)
`;
    const config = await setup("diverge", drifting, [], 12);
    const r = await nimble(["train", config, "--python", python, "--local", "2"], { timeout: 120_000 });
    expect(r.exitCode).not.toBe(0);
    expect(String(r.stderr)).toMatch(/Replicas diverged before step 9/);
  }, 180_000);

  it("rejects a config error with exit code 2, naming file, line and field", async () => {
    const config = await setup("badconfig", TINY_TASK, ["stepz: 3"]);
    const r = await nimble(["train", config, "--python", python], { timeout: 30_000 });
    expect(r.exitCode).toBe(2);
    expect(String(r.stderr)).toContain(`${config}:7`);
    expect(String(r.stderr)).toContain("stepz");
  });
});
