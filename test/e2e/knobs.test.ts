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

// A per-token loss over padded sequences: as (loss_sum, count), the step's loss is the sum over
// every worker's tokens over their total, whatever the split; evaluate gives (sums, counts).
const TOKEN_TASK = `${TASK}
class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8, padding_idx=0)
        self.head = nn.Linear(8, 3)
    def forward(self, input_ids, labels=None):
        return self.head(torch.tanh(self.emb(input_ids)))

def build_model(args):
    return Tagger()

def _token_losses(model, batch):
    ids = batch["input_ids"]
    logits = model(ids)
    mask = ids != 0
    nll = nn.functional.cross_entropy(logits.reshape(-1, 3), (ids % 3).reshape(-1), reduction="none")
    return nll.view(ids.shape), logits, mask

def compute_loss(model, batch):
    nll, _, mask = _token_losses(model, batch)
    return (nll * mask).sum(), mask.sum()

def evaluate(model, batch):
    nll, logits, mask = _token_losses(model, batch)
    right = ((logits.argmax(-1) == batch["input_ids"] % 3) & mask).sum()
    tokens = mask.sum()
    return {"loss": (nll * mask).sum(), "token_acc": right}, {"loss": tokens, "token_acc": tokens}
`;

async function run(name: string, lines: string[], local: number, task = TASK) {
  const config = path.join(tmp.dir, `${name}.yaml`);
  await writeFile(path.join(tmp.dir, `${name}.py`), task);
  await writeFile(
    config,
    [`name: ${name}`, `task: ${name}.py`, "steps: 6", "batch_size: 24", "balance: equal", "compression: {method: none}", "eval: {every: 3, samples: 24, batch_size: 12}", `output: ${path.join(tmp.dir, "runs")}`, ...lines].join("\n") + "\n",
  );
  const result = await nimble(["train", config, "--json", "--local", String(local), "--python", python], { timeout: 240_000 });
  const events = String(result.stdout).trim().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l));
  const done = events.find((e) => e.type === "done");
  return { result, runDir: done?.run_dir as string | undefined, evals: events.filter((e) => e.type === "eval").map((e) => e.metrics as Record<string, number>) };
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

  it("(loss_sum, count) and evaluate's (sums, counts) are exact whatever the split: 1 and 3 workers agree", async () => {
    const knobs = ["optimizer: {name: sgd, lr: 0.5}"];
    const one = await run("tokens-1", knobs, 1, TOKEN_TASK);
    expect(one.result.exitCode, String(one.result.stderr)).toBe(0);
    const three = await run("tokens-3", knobs, 3, TOKEN_TASK);
    expect(three.result.exitCode, String(three.result.stderr)).toBe(0);
    expect((await maxWeightDifference(one.runDir!, three.runDir!)).maxDiff).toBeLessThan(1e-5);
    // Token-weighted metrics: each worker evaluates a slice with its own token count.
    expect(one.evals).toHaveLength(2);
    for (const [a, b] of one.evals.map((m, i) => [m, three.evals[i]])) {
      expect(Object.keys(b).sort()).toEqual(["loss", "token_acc"]);
      expect(Math.abs(a.loss - b.loss)).toBeLessThan(1e-5);
      expect(Math.abs(a.token_acc - b.token_acc)).toBeLessThan(1e-6);
    }
  }, 600_000);

  it("trains a BatchNorm model in bf16 on the CPU, its replicas' statistics agreeing (the hash check covers buffers)", async () => {
    const bf16 = await run("bf16", ["optimizer: {name: adam, lr: 0.01}", "precision: bf16"], 2);
    expect(bf16.result.exitCode, String(bf16.result.stderr)).toBe(0);
  }, 300_000);
});
