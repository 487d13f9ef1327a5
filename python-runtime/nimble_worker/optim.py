"""The inner optimizer and learning-rate schedule named by the job config."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import JobConfig


def param_groups(o, params) -> list[dict]:
    """One group, or with `no_decay` two: no weight decay on biases and norm weights.
    `params` are tensors or (name, tensor) pairs."""
    named = [p if isinstance(p, tuple) else (str(i), p) for i, p in enumerate(params)]
    if not o.no_decay:
        return [{"params": [p for _, p in named]}]
    decay = [p for _, p in named if p.dim() >= 2]
    rest = [p for _, p in named if p.dim() < 2]
    return [g for g in ({"params": decay}, {"params": rest, "weight_decay": 0.0}) if g["params"]]


def build_optimizer(cfg: JobConfig, params) -> torch.optim.Optimizer:
    o = cfg.optimizer
    params = param_groups(o, params)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    if o.name in ("adam", "adamw"):
        kind = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return kind(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.name!r} (sgd, adam, adamw)")


SCHEDULES = ("constant", "linear", "cosine", "warmup_linear", "warmup_cosine")


def lr_factor(cfg: JobConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr at scheduler step s (s = the optimizer step about to run):
    a linear warmup over warmup_steps (warmup_* only), then a linear or cosine decay to
    min_lr reached at decay_steps (0: steps), and min_lr after that."""
    s_cfg, peak = cfg.lr_schedule, cfg.optimizer.lr
    if s_cfg.name == "constant":
        return lambda s: 1.0
    if s_cfg.name not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {s_cfg.name!r} ({', '.join(SCHEDULES)})")
    warm = s_cfg.warmup_steps if s_cfg.name.startswith("warmup_") else 0
    horizon = s_cfg.decay_steps or cfg.steps
    floor = s_cfg.min_lr / peak if peak else 0.0
    cosine = s_cfg.name.endswith("cosine")

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        progress = min(1.0, (s - warm) / max(1, horizon - warm))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cosine else 1.0 - progress
        return floor + (1.0 - floor) * shape
    return f


def build_scheduler(cfg: JobConfig, optimizer: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
