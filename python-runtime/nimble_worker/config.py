"""The job config as the worker sees it: the `config` object of `init`.

The TypeScript side validates the YAML and fills defaults; the same defaults are
applied here so that a partial dict still works. Unknown keys (providers,
local_workers, output, ...) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(Exception):
    """A config value the worker cannot use; sent as `error` with kind `config` and the
    dotted `field` (e.g. `compression.rank`), which the coordinator maps to a YAML line."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    """One of sgd, adam, adamw."""
    lr: float = 0.01
    """Peak learning rate (the schedule multiplies it)."""
    momentum: float = 0.0
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: float = 0.0
    """L2 penalty (sgd, adam) or decoupled decay (adamw)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW moment coefficients."""
    eps: float = 1e-8
    """Adam/AdamW denominator epsilon."""


@dataclass
class ScheduleConfig:
    name: str = "constant"
    """constant, or warmup_cosine (linear warmup then cosine decay to min_lr at `steps`)."""
    warmup_steps: int = 0
    """Steps of linear warmup (warmup_cosine only)."""
    min_lr: float = 0.0
    """Learning rate reached at the last step (warmup_cosine only)."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every this many steps; 0 disables periodic evaluation."""
    samples: int = 1000
    """How many validation items (from the start of the val split) each evaluation uses."""
    batch_size: int = 256
    """Evaluation batch size per worker."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Checkpoint every this many steps; 0 disables periodic checkpoints."""
    keep: int = 3
    """How many checkpoints the coordinator keeps."""


@dataclass
class CompressionConfig:
    method: str = "powersgd"
    """How gradients travel: none (float32), fp16, bf16, int8 (lossy wire codecs of one
    all-reduce), powersgd (low-rank, torch's powerSGD_hook semantics) or topk (sparse)."""
    rank: int = 4
    """PowerSGD: rank of the approximation P Q^T of each compressed weight matrix."""
    start_step: int = 10
    """powersgd/topk: steps before this one use one plain float32 all-reduce (like torch's
    start_powerSGD_iter); error-feedback memories start at this step."""
    min_compression_rate: float = 2.0
    """PowerSGD: a matrix (n, m) is compressed only if r (n + m) x this < n m."""
    error_feedback: bool = True
    """powersgd/topk: carry what compression left out into the next step's gradient."""
    warm_start: bool = True
    """PowerSGD: reuse last step's Q (else a fresh random Q every step)."""
    ratio: float = 0.01
    """topk: fraction of the flattened gradient each worker sends, in (0, 1]."""
    seed: int = 0
    """PowerSGD: seed of the generator that draws the initial Q (the same on every worker)."""


@dataclass
class StrategyConfig:
    name: str = "sync"
    """The training strategy (nimble_worker/strategies): sync, one optimizer step of the
    global batch per round, its gradient all-reduced through `compression`."""


@dataclass
class JobConfig:
    name: str = "job"
    """The job's name."""
    task: str = "task.py"
    """Path of the researcher's task file (relative to the YAML file)."""
    task_args: dict[str, Any] = field(default_factory=dict)
    """Free-form arguments passed to build_model and build_dataset."""
    steps: int = 1
    """Number of optimizer steps (global batches)."""
    batch_size: int = 1
    """Global batch size, split between workers by shares."""
    seed: int = 0
    """Seed of model init, data order and per-step RNG."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer settings."""
    lr_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Periodic checkpoint settings."""
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """Gradient compression settings (nimble_worker/compress)."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """What one round is and what crosses the network (nimble_worker/strategies)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobConfig":
        sub = {"optimizer": OptimizerConfig, "lr_schedule": ScheduleConfig,
               "eval": EvalConfig, "checkpoint": CheckpointConfig,
               "compression": CompressionConfig, "strategy": StrategyConfig}
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d or d[f.name] is None:
                continue
            v = d[f.name]
            kw[f.name] = _build(sub[f.name], v) if f.name in sub else v
        cfg = cls(**kw)
        cfg.optimizer.betas = tuple(float(b) for b in cfg.optimizer.betas)  # type: ignore[assignment]
        cfg.task_args = dict(cfg.task_args or {})
        return cfg


def _build(kind, d: dict[str, Any]):
    names = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in (d or {}).items() if k in names and v is not None})
