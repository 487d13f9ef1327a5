import { execa } from "execa";
import { chmod, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserError } from "../../src/errors.js";
import { DEFAULT_TORCH_SPEC, managedEnvDir, resolvePython } from "../../src/runtime/python.js";
import { testPython } from "../helpers/processes.js";

/** An interpreter with torch: $NIMBLE_PYTHON (e.g. /tmp/venv-probe/bin/python) or the managed environment. */
let PROBE_PYTHON = "";
let tmp = "";
beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), "nimble-python-"));
  PROBE_PYTHON = await testPython();
}, 600_000);
afterAll(() => rm(tmp, { recursive: true, force: true }));

async function rejection(p: Promise<unknown>): Promise<UserError> {
  const err = await p.then(
    () => {
      throw new Error("expected resolvePython to reject");
    },
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(UserError);
  return err as UserError;
}

/** Is there a system python3 without torch (the usual case for a researcher's laptop)? */
const systemPythonWithoutTorch = await execa("python3", ["-c", "import torch"], { reject: false }).then(
  (r) => r.exitCode !== 0 && /No module named .?torch/.test(String(r.stderr)),
  () => false,
);

describe("resolvePython", () => {
  it("rejects an interpreter path that does not exist, naming it, with a hint", async () => {
    const err = await rejection(resolvePython({ python: "/nonexistent/python", env: {} }));
    expect(err.message).toContain("/nonexistent/python");
    expect(err.hint).toMatch(/--python|NIMBLE_PYTHON/);
    expect(err.exitCode).not.toBe(0);
  });

  it("rejects $NIMBLE_PYTHON pointing nowhere, naming it", async () => {
    const err = await rejection(resolvePython({ env: { NIMBLE_PYTHON: "/nonexistent/env-python" } }));
    expect(err.message).toContain("/nonexistent/env-python");
    expect(err.hint).toBeTruthy();
  });

  it("rejects an executable that is not a Python with torch, naming it and saying why", async () => {
    const fake = path.join(tmp, "fake-python");
    await writeFile(fake, "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n");
    await chmod(fake, 0o755);
    const err = await rejection(resolvePython({ python: fake, env: {} }));
    expect(err.message).toContain(fake);
    expect(err.message).toContain("No module named 'torch'");
    expect(err.hint).toMatch(/torch/);
  });

  it("rejects an executable that exits 0 but prints no probe result", async () => {
    const err = await rejection(resolvePython({ python: "/bin/true", env: {} }));
    expect(err.message).toContain("/bin/true");
  });

  it.skipIf(!systemPythonWithoutTorch)("rejects the system python3, which has no torch, naming it", async () => {
    const err = await rejection(resolvePython({ python: "python3", env: {} }));
    expect(err.message).toMatch(/interpreter python3 /);
    expect(err.message).toMatch(/torch/);
    expect(err.hint).toBeTruthy();
  }, 60_000);

  it("with NIMBLE_PYTHON set, resolves that interpreter with source env, its torch version and devices", async () => {
    const env = await resolvePython({ env: { NIMBLE_PYTHON: PROBE_PYTHON } });
    expect(env.python).toBe(PROBE_PYTHON);
    expect(env.source).toBe("env");
    expect(env.torchVersion).toMatch(/^\d+\.\d+/);
    expect(env.pythonVersion).toMatch(/^3\.\d+/);
    expect(env.probe?.devices.length).toBeGreaterThanOrEqual(1);
    for (const d of env.probe!.devices) {
      expect(d.id).toMatch(/^(cpu|cuda:\d+|mps)$/);
      expect(d.kind).toBeTruthy();
      expect(d.name).toBeTruthy();
    }
  }, 120_000);

  it("prefers --python over NIMBLE_PYTHON and reports source option", async () => {
    const env = await resolvePython({ python: PROBE_PYTHON, env: { NIMBLE_PYTHON: "/nonexistent/python" } });
    expect(env.source).toBe("option");
    expect(env.python).toBe(PROBE_PYTHON);
  }, 120_000);
});

describe("managed environment", () => {
  it("reports a torch requirement pip cannot install, naming it, and is not marked ready", async () => {
    const cache = path.join(tmp, "bad-requirement");
    const spec = "torch==0.0.1";
    const err = await rejection(resolvePython({ torchSpec: spec, env: { ...process.env, NIMBLE_PYTHON: "", NIMBLE_CACHE_DIR: cache } }));
    expect(err.message).toContain(`Could not install ${spec}`);
    expect(err.hint).toMatch(/NIMBLE_TORCH|--python/);
    // An interrupted or failed install never counts as a ready environment.
    await expect(import("node:fs/promises").then((fs) => fs.access(path.join(managedEnvDir(spec, { NIMBLE_CACHE_DIR: cache }), "nimble-env.json")))).rejects.toThrow();
  }, 180_000);
});

describe("managedEnvDir", () => {
  it("lives under NIMBLE_CACHE_DIR and differs per torch requirement", () => {
    const env = { NIMBLE_CACHE_DIR: path.join(tmp, "cache") };
    const a = managedEnvDir("torch==2.13.0", env);
    const b = managedEnvDir("torch==2.12.1", env);
    const c = managedEnvDir("torch>=2.0", env);
    for (const dir of [a, b, c]) expect(dir.startsWith(path.join(tmp, "cache") + path.sep)).toBe(true);
    expect(new Set([a, b, c]).size).toBe(3);
    expect(managedEnvDir("torch==2.13.0", env)).toBe(a);
  });

  it("falls back to XDG_CACHE_HOME/nimble, then ~/.cache/nimble", () => {
    expect(managedEnvDir(DEFAULT_TORCH_SPEC, { XDG_CACHE_HOME: "/x/cache" }).startsWith(path.join("/x/cache", "nimble") + path.sep)).toBe(true);
    expect(managedEnvDir(DEFAULT_TORCH_SPEC, {}).startsWith(path.join(os.homedir(), ".cache", "nimble") + path.sep)).toBe(true);
  });

  it("uses a cached managed environment with a matching marker without probing or installing", async () => {
    const cache = path.join(tmp, "cache2");
    const spec = "torch==9.9.9";
    const dir = managedEnvDir(spec, { NIMBLE_CACHE_DIR: cache });
    await mkdir(path.join(dir, "bin"), { recursive: true });
    await writeFile(path.join(dir, "bin", "python"), "#!/bin/sh\nexit 1\n", { mode: 0o755 });
    await writeFile(path.join(dir, "nimble-env.json"), JSON.stringify({ torchSpec: spec, python: "3.12.1", torch: "9.9.9" }));
    const env = await resolvePython({ env: { NIMBLE_CACHE_DIR: cache, NIMBLE_TORCH: spec } });
    expect(env).toMatchObject({ python: path.join(dir, "bin", "python"), source: "managed", torchVersion: "9.9.9", pythonVersion: "3.12.1" });
  });
});
