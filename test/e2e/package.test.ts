/**
 * Task packages (issue "Real training code"): a `task:` that names a folder ships it. Its
 * task.py imports a sibling module and reads a data file beside it; a .nimbleignore leaves
 * a file out. Providers get the package in chunks once, and take it from their cache by
 * hash the next time. A single-file task that imports a sibling is told to name the folder.
 */
import { randomUUID } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { nimble, startProvider, type TempDir, useE2E } from "../helpers/processes.js";

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

const TASK = `import os, torch
from model import build  # a sibling module of the package

HERE = os.path.dirname(os.path.abspath(__file__))

class Points(torch.utils.data.Dataset):
    def __init__(self, n):
        with open(os.path.join(HERE, "data", "scale.txt")) as f:  # a data file beside the task
            scale = float(f.read().split()[0])
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g) * scale
        self.y = (self.x.sum(1) > 0).long()
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return self.x[i], self.y[i]

def build_model(args):
    return build()

def build_dataset(split, args):
    return Points(64 if split == "train" else 16)
`;

async function train(config: string) {
  const r = await nimble(["train", config, "--json", "--python", python], { timeout: 240_000 });
  const events = String(r.stdout).trim().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l));
  return { r, events, runDir: events.find((e) => e.type === "done")?.run_dir as string | undefined };
}

describe("task packages", () => {
  it("ship a folder with its modules and data, once per provider, cached by hash", async () => {
    const dir = path.join(tmp.dir, "my_task");
    await mkdir(path.join(dir, "data"), { recursive: true });
    await mkdir(path.join(dir, "__pycache__"), { recursive: true });
    await writeFile(path.join(dir, "task.py"), TASK);
    await writeFile(path.join(dir, "model.py"), "import torch\n\ndef build():\n    return torch.nn.Linear(4, 2)\n");
    // A unique package each run: the providers' cache must not have it yet.
    await writeFile(path.join(dir, "data", "scale.txt"), `2.0 ${randomUUID()}\n`);
    await writeFile(path.join(dir, "notes-private.txt"), "not for providers\n");
    await writeFile(path.join(dir, ".nimbleignore"), "# left out\nnotes-*.txt\n");
    await writeFile(path.join(dir, "__pycache__", "model.cpython-311.pyc"), "junk");
    // Two providers with caches of their own (local providers of one host would share one,
    // and whichever unpacked the package first would spare the other the fetch).
    const providers = await Promise.all(
      ["a", "b"].map((n) => startProvider(python, `pkg-${n}`, [], { env: { ...process.env, NIMBLE_CACHE_DIR: path.join(tmp.dir, `cache-${n}`) } })),
    );
    const config = path.join(tmp.dir, "package.yaml");
    await writeFile(
      config,
      [
        "name: package",
        "task: my_task",
        "steps: 3",
        "batch_size: 16",
        "compression: {method: none}",
        `output: ${path.join(tmp.dir, "runs")}`,
        "providers:",
        ...providers.map((p, i) => `  - {address: "${p.address}", token: pkg-${"ab"[i]}}`),
      ].join("\n") + "\n",
    );

    const first = await train(config);
    expect(first.r.exitCode, String(first.r.stderr)).toBe(0);
    const sent = (events: { type: string; message?: string }[]) => events.filter((e) => e.type === "status" && /^Sending the task package/.test(e.message ?? ""));
    expect(sent(first.events)).toHaveLength(2); // each provider asked for it once
    // The run folder keeps what was shipped, and only that.
    const copy = path.join(first.runDir!, "my_task");
    expect(await readFile(path.join(copy, "model.py"), "utf8")).toContain("def build()");
    expect(existsSync(path.join(copy, "data", "scale.txt"))).toBe(true);
    expect(existsSync(path.join(copy, "notes-private.txt"))).toBe(false);
    expect(existsSync(path.join(copy, "__pycache__"))).toBe(false);

    const second = await train(config);
    expect(second.r.exitCode, String(second.r.stderr)).toBe(0);
    expect(sent(second.events)).toHaveLength(0); // from the providers' cache, by hash
    for (const p of providers) p.child.kill("SIGTERM");
  }, 400_000);

  it("a single-file task that imports a sibling module is told to name the folder", async () => {
    const dir = path.join(tmp.dir, "lone");
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, "task.py"), TASK);
    await writeFile(path.join(dir, "model.py"), "import torch\n\ndef build():\n    return torch.nn.Linear(4, 2)\n");
    const config = path.join(dir, "nimble.yaml");
    await writeFile(config, ["name: lone", "task: task.py", "steps: 2", "batch_size: 8", `output: ${path.join(dir, "runs")}`].join("\n") + "\n");
    const r = await nimble(["train", config, "--local", "1", "--python", python], { timeout: 120_000 });
    expect(r.exitCode).toBe(3);
    expect(String(r.stderr)).toContain("No module named 'model'");
    expect(String(r.stderr)).toContain("If model.py (or a model/ package) lies beside the task file, name the task's folder in the config's `task:` so that it ships with it.");
  }, 200_000);
});
