import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A tiny regression/classification task: deterministic data, no dropout, nested batches.
TINY_TASK = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset


class Points(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def build_dataset(split, args):
    return Points(args.get("n", 50) if split == "train" else 20, 1 if split == "train" else 2)


def build_model(args):
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def compute_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def evaluate(model, batch):
    logits = model(batch["x"])
    return {"loss": F.cross_entropy(logits, batch["y"]).item(),
            "accuracy": (logits.argmax(1) == batch["y"]).float().mean().item()}
'''

TINY_CONFIG = {
    "name": "tiny", "task": "task.py", "task_args": {"n": 50}, "steps": 10, "batch_size": 8,
    "seed": 3, "optimizer": {"name": "adam", "lr": 0.01},
    "lr_schedule": {"name": "warmup_cosine", "warmup_steps": 2, "min_lr": 0.001},
    "eval": {"every": 5, "samples": 20, "batch_size": 7}, "checkpoint": {"every": 5, "keep": 3},
    "local_workers": 3, "providers": [], "output": "runs",
}


@pytest.fixture
def tiny_task(tmp_path):
    path = tmp_path / "task.py"
    path.write_text(TINY_TASK)
    return str(path)
