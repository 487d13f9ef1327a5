/**
 * A new user's first minutes (issue "Real training code"): `nimble init` writes a config
 * and a task, `--dry-run` builds them and runs one step on one local worker (no providers,
 * no run folder), and a broken task fails the dry run with exit code 3, naming the function.
 */
import { existsSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { nimble, type TempDir, useE2E } from "../helpers/processes.js";

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

describe("nimble init and --dry-run", () => {
  it("scaffolds a job that passes a dry run, refuses to overwrite it, and a broken task fails with exit 3", async () => {
    const dir = path.join(tmp.dir, "job");
    const init = await nimble(["init", dir]);
    expect(init.exitCode, String(init.stderr)).toBe(0);
    const config = path.join(dir, "nimble.yaml");
    expect(existsSync(config) && existsSync(path.join(dir, "task.py"))).toBe(true);
    const again = await nimble(["init", dir]);
    expect(again.exitCode).toBe(2);
    expect(String(again.stderr)).toContain("already exist: nothing was written");

    const dry = await nimble(["train", config, "--dry-run", "--json", "--python", python], { timeout: 120_000 });
    expect(dry.exitCode, String(dry.stderr)).toBe(0);
    const r = JSON.parse(String(dry.stdout).trim());
    expect(r).toMatchObject({ type: "dry_run", ok: true, model: "Sequential (1,348 parameters)", train_size: 4096, val_size: 512, batch_size: 64 });
    expect(r.loss).toBeGreaterThan(0);
    expect(existsSync(path.join(dir, "runs"))).toBe(false); // no run folder

    const task = await readFile(path.join(dir, "task.py"), "utf8");
    await writeFile(path.join(dir, "task.py"), task.replace("def build_model(args):\n", "def build_model(args):\n    raise RuntimeError('no model today')\n"));
    const broken = await nimble(["train", config, "--dry-run", "--set", "steps=50", "--python", python], { timeout: 120_000 });
    expect(broken.exitCode).toBe(3);
    expect(String(broken.stderr)).toMatch(/error: task\.py: build_model: RuntimeError: no model today/);
  }, 300_000);
});
