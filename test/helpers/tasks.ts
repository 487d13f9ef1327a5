/**
 * Source of a small task file for tests: `features`-dimensional Gaussian points labelled by
 * the sign of their sum, a model, and whatever `extra` Python is appended (compute_loss
 * overrides that die, stall or produce NaN).
 */
export function tinyTask(opts: { features?: number; model?: string; train?: number; val?: number; extra?: string } = {}): string {
  const features = opts.features ?? 4;
  return `import os, time
import torch

class Items(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, ${features}, generator=g)
        self.y = (self.x.sum(1) > 0).long()
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return self.x[i], self.y[i]

def build_model(args):
    return ${opts.model ?? `torch.nn.Linear(${features}, 2)`}

def build_dataset(split, args):
    return Items(${opts.train ?? 256} if split == "train" else ${opts.val ?? 64})
${opts.extra ?? ""}`;
}

/** The chaos tests' task: 8 features, a small MLP, 512 training and 128 validation items (`extra` overrides compute_loss). */
export const mlpTask = (extra: string): string =>
  tinyTask({
    features: 8,
    model: "torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))",
    train: 512,
    val: 128,
    extra,
  });
