/**
 * `nimble init`: a job config with every section commented, and a task file that trains
 * as it is (synthetic data, so it needs nothing downloaded), to edit into your own.
 */
import { existsSync } from "node:fs";
import { mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import { UserError } from "../errors.js";

export const CONFIG = `# A Nimble job (README.md, "Config reference"). Try it: nimble train nimble.yaml --dry-run
name: my-job
task: task.py              # the task file (build_model, build_dataset, ...), relative to this file
task_args: {classes: 4}    # passed to build_model(args) and build_dataset(split, args)
steps: 200                 # optimizer steps
batch_size: 64             # global samples per step, split among the workers
seed: 0
optimizer: {name: adamw, lr: 0.003, weight_decay: 0.01, no_decay: true}
lr_schedule: {name: warmup_cosine, warmup_steps: 20}   # or constant, linear, cosine, warmup_linear
grad_clip: 1.0             # clip the reduced gradient's global norm (0: off)
precision: fp32            # or bf16, fp16
prefetch: 2                # steps of batches loaded ahead on a background thread (0: off)
compression: {method: none}  # over internet links: powersgd (the default), int8, fp16, bf16, topk
eval: {every: 50, samples: 512, batch_size: 256}
checkpoint: {every: 100, keep: 3}
local_workers: 2           # with no providers: this many local ones
# providers:               # or train on other hosts running \`nimble provide\`
#   - {address: 10.0.0.7:7070, key: "ed25519:..."}   # its key, from \`nimble id\` there
#   - {address: 10.0.0.8:7070, token: "..."}
`;

export const TASK = `"""A Nimble task: plain PyTorch, no base class (README.md, "The task contract").

Replace the synthetic data and the model with yours. Optional functions: compute_loss,
evaluate, collate and build_optimizer.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Blobs(torch.utils.data.Dataset):
    """Points around one centre per class: learnable in a few steps."""

    def __init__(self, n, classes, seed):
        centres = torch.randn(classes, 16, generator=torch.Generator().manual_seed(0)) * 3
        g = torch.Generator().manual_seed(seed)  # the splits differ in their points only
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = centres[self.y] + torch.randn(n, 16, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def build_dataset(split, args):
    return Blobs(4096 if split == "train" else 512, args.get("classes", 4), 0 if split == "train" else 1)


def build_model(args):
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, args.get("classes", 4)))


def evaluate(model, batch):
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(1) == y).float().mean().item()}
`;

/** Write nimble.yaml and task.py into `dir` (made if missing); never over existing files. */
export async function scaffold(dir: string): Promise<string[]> {
  const files = [
    [path.join(dir, "nimble.yaml"), CONFIG],
    [path.join(dir, "task.py"), TASK],
  ] as const;
  const there = files.filter(([f]) => existsSync(f)).map(([f]) => f);
  if (there.length > 0) throw new UserError(`${there.join(" and ")} already exist${there.length === 1 ? "s" : ""}: nothing was written`, "Run `nimble init` in an empty folder, or name a new one: `nimble init my-job`.", 2);
  await mkdir(dir, { recursive: true });
  for (const [file, text] of files) await writeFile(file, text, { flag: "wx" });
  return files.map(([f]) => f);
}
