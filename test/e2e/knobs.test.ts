/**
 * Real training code, end to end (issue "Real training code"): a task with variable-length
 * dict items and its own collate, a model that returns an object with `.loss` and holds
 * BatchNorm statistics, trained with grad_clip on 1 and on 3 local workers (the same
 * weights within 1e-4: compression none, equal shares, SGD), and in bf16 on the CPU. The
 * coordinator's replica-hash check covers the buffers, so a run that passes agrees on them.
 */
import { writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { nimble, type TempDir, useE2E } from "../helpers/processes.js";
import { maxWeightDifference } from "../helpers/safetensors.js";

let python = "";
let tmp: TempDir;
useE2E((env) => ({ python, tmp } = env));

const TASK = `
import torch, torch.nn as nn
from types import SimpleNamespace

class Seqs(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(1, 16, (1 + i % 6,), generator=g)  # 0 pads
        return {"ids": ids, "label": torch.tensor(int(ids.sum()) % 2)}

def collate(items):
    width = max(len(it["ids"]) for it in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    for r, it in enumerate(items):
        ids[r, :len(it["ids"])] = it["ids"]
    return {"input_ids": ids, "labels": torch.stack([it["label"] for it in items])}

class Classifier(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.emb = nn.Embedding(16, 16, padding_idx=0)  # padding adds nothing, however the batch is split
        self.norm = nn.BatchNorm1d(16) if norm else nn.Identity()
        self.head = nn.Linear(16, 2)
    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.norm(self.emb(input_ids).sum(1))))
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return SimpleNamespace(loss=loss, logits=logits)

def build_dataset(split, args):
    return Seqs(96 if split == "train" else 24)

def build_model(args):
    return Classifier(args.get("norm", True))
`;

async function run(name: string, lines: string[], local: number) {
  const config = path.join(tmp.dir, `${name}.yaml`);
  await writeFile(path.join(tmp.dir, "task.py"), TASK);
  await writeFile(
    config,
    [`name: ${name}`, "task: task.py", "steps: 6", "batch_size: 24", "balance: equal", "compression: {method: none}", "eval: {every: 3, samples: 24, batch_size: 12}", `output: ${path.join(tmp.dir, "runs")}`, ...lines].join("\n") + "\n",
  );
  const result = await nimble(["train", config, "--json", "--local", String(local), "--python", python], { timeout: 240_000 });
  const done = String(result.stdout).trim().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l)).find((e) => e.type === "done");
  return { result, runDir: done?.run_dir as string | undefined };
}

describe("real training code, end to end", () => {
  it("collate, a model returning .loss, grad_clip: 1 and 3 workers reach the same weights", async () => {
    // No BatchNorm here: its batch statistics depend on how the batch is split.
    const knobs = ["optimizer: {name: sgd, lr: 0.3}", "grad_clip: 0.1", "task_args: {norm: false}"];
    const one = await run("clip-1", knobs, 1);
    expect(one.result.exitCode, String(one.result.stderr)).toBe(0);
    const three = await run("clip-3", knobs, 3);
    expect(three.result.exitCode, String(three.result.stderr)).toBe(0);
    const { maxDiff, values } = await maxWeightDifference(one.runDir!, three.runDir!);
    expect(values).toBeGreaterThanOrEqual(16 * 16 + 16 * 2 + 2);
    expect(maxDiff).toBeLessThan(1e-4);
  }, 600_000);

  it("trains a BatchNorm model in bf16 on the CPU, its replicas' statistics agreeing (the hash check covers buffers)", async () => {
    const bf16 = await run("bf16", ["optimizer: {name: adam, lr: 0.01}", "precision: bf16"], 2);
    expect(bf16.result.exitCode, String(bf16.result.stderr)).toBe(0);
  }, 300_000);
});
