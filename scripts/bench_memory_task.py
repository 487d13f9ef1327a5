"""The memory benchmark's task (scripts/bench-memory.mjs): an MLP of `layers` x
Linear(width, width) with ReLUs between (12 x 2048: 50.4M parameters), trained on random
inputs with random class labels (cross-entropy over `width` classes). The data is made
from a fixed seed, small beside the model: what the benchmark weighs is the model, its
gradient and how they travel.

task_args: width (2048), layers (12), train (256 items), val (64).
"""

import torch
from torch import nn


class Items(torch.utils.data.Dataset):
    def __init__(self, n, width, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, width, generator=g)
        self.y = torch.randint(0, width, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def build_model(args):
    width, layers = int(args.get("width", 2048)), int(args.get("layers", 12))
    mods = []
    for k in range(layers):
        mods.append(nn.Linear(width, width))
        if k < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def build_dataset(split, args):
    width = int(args.get("width", 2048))
    n = int(args.get("train", 256)) if split == "train" else int(args.get("val", 64))
    return Items(n, width, 1 if split == "train" else 2)
