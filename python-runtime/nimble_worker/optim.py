"""The inner optimizer and learning-rate schedule named by the job config."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import JobConfig


def build_optimizer(cfg: JobConfig, params) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    if o.name in ("adam", "adamw"):
        kind = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return kind(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.name!r} (sgd, adam, adamw)")


def lr_factor(cfg: JobConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr at scheduler step s (s = the optimizer step about to run)."""
    s_cfg, peak, total = cfg.lr_schedule, cfg.optimizer.lr, cfg.steps
    if s_cfg.name == "constant":
        return lambda s: 1.0
    if s_cfg.name != "warmup_cosine":
        raise ValueError(f"unknown lr_schedule {s_cfg.name!r} (constant, warmup_cosine)")
    warm, floor = s_cfg.warmup_steps, (s_cfg.min_lr / peak if peak else 0.0)

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        progress = min(1.0, (s - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def build_scheduler(cfg: JobConfig, optimizer: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
