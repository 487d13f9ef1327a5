/**
 * Per-job requirements: what the config accepts, what a provider accepts as a lock, and
 * resolution and installation with real pip against a local folder of tiny wheels
 * (PIP_FIND_LINKS + PIP_NO_INDEX: no index is reached).
 */
import { execa } from "execa";
import { existsSync } from "node:fs";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { REQUIREMENT_PATTERN } from "../../src/config/schema.js";
import { installRequirements, lockRequirements, lockText, parseLock } from "../../src/runtime/requirements.js";
import { REPO_ROOT, testPython } from "../helpers/processes.js";

describe("requirement strings in the config", () => {
  it("accept requirements by name, with extras, versions and markers", () => {
    for (const r of ["tqdm", "tqdm>=4.6", "rich[jupyter]==13.7.1", "a.b_c-d~=1.2", "x>=1,<2", 'tomli; python_version < "3.11"', "pkg===1.0"]) {
      expect(REQUIREMENT_PATTERN.test(r), r).toBe(true);
    }
  });
  it("refuse pip options, URLs and paths, which a provider could not (or must not) follow", () => {
    for (const r of ["-e .", "--index-url https://evil/simple", "-r other.txt", "foo @ https://x/foo.whl", "git+https://github.com/a/b", "./pkg", "/abs/pkg", "foo bar", ""]) {
      expect(REQUIREMENT_PATTERN.test(r), r).toBe(false);
    }
  });
});

describe("a provider's check of the lock", () => {
  const sha = "a".repeat(64);
  it("takes name==version --hash lines only", () => {
    expect(parseLock(lockText([{ name: "b", version: "2.0", sha256: sha }, { name: "a", version: "1.0+local", sha256: sha }]))).toEqual([
      { name: "a", version: "1.0+local", sha256: sha },
      { name: "b", version: "2.0", sha256: sha },
    ]);
  });
  it.each([
    ["an index option", `--index-url https://evil/simple\nfoo==1 --hash=sha256:${sha}\n`],
    ["a URL", `foo @ https://evil/foo.whl --hash=sha256:${sha}\n`],
    ["no hash", "foo==1.0\n"],
    ["a range", `foo>=1.0 --hash=sha256:${sha}\n`],
    ["an extra option", `foo==1.0 --hash=sha256:${sha} --no-binary :all:\n`],
    ["nothing", "\n"],
  ])("refuses %s", (_what, text) => {
    expect(() => parseLock(text)).toThrow(/requirements lock/);
  });
});

describe("resolving and installing with pip", () => {
  let dir = "";
  let python = "";
  let env: NodeJS.ProcessEnv = {};
  beforeAll(async () => {
    python = await testPython();
    dir = await mkdtemp(path.join(os.tmpdir(), "nimble-req-"));
    await execa(python, [path.join(REPO_ROOT, "test/fixtures/make_wheels.py"), path.join(dir, "wheels")]);
    env = { ...process.env, NIMBLE_CACHE_DIR: path.join(dir, "cache"), PIP_FIND_LINKS: path.join(dir, "wheels"), PIP_NO_INDEX: "1", NIMBLE_NO_UV: "1" };
  }, 120_000);
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it("locks a requirement and its dependency to exact versions and hashes, once", async () => {
    const lines: string[] = [];
    const lock = await lockRequirements(["nimbletiny"], python, { env, onProgress: (l) => lines.push(l) });
    expect(lock?.packages.map((p) => `${p.name}==${p.version}`)).toEqual(["nimbledep==1.2.0", "nimbletiny==0.1.0"]);
    expect(lines.join("\n")).toMatch(/Resolving 1 requirement against the base environment \(torch 2\./);
    // The second time the lock comes from the cache: no index is asked (none is reachable now).
    const again = await lockRequirements(["nimbletiny"], python, { env: { ...env, PIP_FIND_LINKS: path.join(dir, "nowhere") } });
    expect(again?.hash).toBe(lock?.hash);
  }, 120_000);

  it("needs no lock for what the base environment has", async () => {
    expect(await lockRequirements(["torch"], python, { env })).toBeNull();
    expect(await lockRequirements([], python, { env })).toBeNull();
  }, 120_000);

  it("refuses a requirement that would change torch, saying so", async () => {
    const err = await lockRequirements(["badtorch"], python, { env }).catch((e) => e);
    expect(err.message).toMatch(/could not be resolved/);
    expect(err.message).toMatch(/badtorch 1\.0\.0 depends on torch<2/);
    expect(err.hint).toMatch(/not change the base environment's: torch 2\.\S+ stay/);
    expect(err.exitCode).toBe(2);
  }, 120_000);

  it("installs a lock into a cached folder that the worker's Python imports from", async () => {
    const lock = (await lockRequirements(["nimbletiny"], python, { env }))!;
    const first = await installRequirements(lock.lock, python, { env });
    expect(first.cached).toBe(false);
    const code = `import site, sys; site.addsitedir(sys.argv[1]); import nimbletiny, nimbledep, torch; print(nimbletiny.VALUE, nimbledep.X)`;
    expect((await execa(python, ["-c", code, first.dir])).stdout).toBe("42 1");
    expect(await installRequirements(lock.lock, python, { env })).toEqual({ dir: first.dir, cached: true });
    expect((await readdir(path.dirname(first.dir))).filter((n) => n.includes(".part-"))).toEqual([]);
  }, 120_000);

  it("reports a failed install naming the package, and leaves nothing half-installed", async () => {
    const lock = (await lockRequirements(["nimbletiny"], python, { env }))!;
    const tampered = lock.lock.replace(/nimbledep==1\.2\.0 --hash=sha256:[0-9a-f]{64}/, `nimbledep==1.2.0 --hash=sha256:${"0".repeat(64)}`);
    const err = await installRequirements(tampered, python, { env }).catch((e) => e);
    expect(err.message).toMatch(/installing nimbledep==1\.2\.0 failed/);
    const envs = path.join(dir, "cache", "envs");
    expect((await readdir(envs)).filter((n) => n.includes(".part-"))).toEqual([]);
    expect(existsSync(path.join(envs, "nothing"))).toBe(false);
  }, 120_000);
});
