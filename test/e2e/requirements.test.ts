/**
 * Per-job requirements end to end: a task that imports a package the base environment lacks
 * trains once the config names it under `requirements:` (resolved on the coordinator,
 * installed by each confined provider from its own index: here a folder of tiny wheels), and a
 * provider whose owner forbids per-job installs refuses the job, saying so.
 */
import { mkdir, readdir, writeFile } from "node:fs/promises";
import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { execa, nimble, REPO_ROOT, startProvider, type TempDir, useE2E } from "../helpers/processes.js";
import { tinyTask } from "../helpers/tasks.js";

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

const TASK = tinyTask({
  train: 64,
  val: 16,
  extra: `
import nimbletiny  # from the job's requirements, not the base environment
_build = build_model
def build_model(args):
    assert nimbletiny.VALUE == 42
    return _build(args)
`,
});

let env: NodeJS.ProcessEnv = {};
beforeAll(async () => {
  await execa(python, [path.join(REPO_ROOT, "test/fixtures/make_wheels.py"), path.join(tmp.dir, "wheels")]);
  await mkdir(path.join(tmp.dir, "needs_tiny"));
  await writeFile(path.join(tmp.dir, "needs_tiny", "task.py"), TASK);
  env = { ...process.env, NIMBLE_CACHE_DIR: path.join(tmp.dir, "cache"), PIP_FIND_LINKS: path.join(tmp.dir, "wheels"), PIP_NO_INDEX: "1" };
}, 600_000);

async function config(name: string, lines: string[]): Promise<string> {
  const file = path.join(tmp.dir, `${name}.yaml`);
  await writeFile(file, [`name: ${name}`, "task: needs_tiny", "steps: 2", "batch_size: 16", "compression: {method: none}", "requirements: [nimbletiny]", `output: ${path.join(tmp.dir, "runs")}`, ...lines].join("\n") + "\n");
  return file;
}

describe("requirements", () => {
  it("are resolved once, installed by each provider into a cached folder, and imported by the task", async () => {
    const file = await config("needs", ["local_workers: 2"]);
    const r = await nimble(["train", file, "--json", "--python", python], { env, timeout: 240_000 });
    const events = String(r.stdout).trim().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l));
    expect(r.exitCode, String(r.stderr)).toBe(0);
    expect(events.find((e) => e.type === "done")?.summary.steps).toBe(2);
    const said = events.filter((e) => e.type === "status" || e.type === "log").map((e) => e.message ?? e.line);
    expect(said.some((l) => /^Requirements: nimbledep 1\.2\.0, nimbletiny 0\.1\.0 \(lock [0-9a-f]{12}\)/.test(l))).toBe(true);
    expect(said.some((l) => /installed requirements [0-9a-f]{12} in|are installed here already/.test(l))).toBe(true);
    const envs = await readdir(path.join(tmp.dir, "cache", "envs"));
    expect(envs.filter((n) => !n.includes(".part-"))).toHaveLength(1);
  }, 300_000);

  it("are refused by a provider started with --no-job-requirements, which says why", async () => {
    const provider = await startProvider(python, "no-installs", ["--no-job-requirements"], { env });
    const file = await config("refused", ["providers:", `  - {address: "${provider.address}", token: no-installs}`]);
    const r = await nimble(["train", file, "--python", python], { env, timeout: 120_000 });
    expect(r.exitCode).toBe(1);
    expect(String(r.stderr)).toMatch(/refuses jobs that bring requirements \(its owner started it with --no-job-requirements\); this job needs 2 package\(s\)/);
    expect(String(r.stderr)).toMatch(/hint: Check `requirements:` in the config/);
  }, 180_000);
});
