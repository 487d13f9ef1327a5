"""The job config as the worker sees it: the `config` object of `init`.

The TypeScript side validates the YAML and fills defaults; the same defaults are
applied here so that a partial dict still works. Unknown keys (providers,
local_workers, output, ...) are ignored. The config arrives from the coordinator, so
every known key is checked against its field's type (finite numbers, integers within
64 bits, bounded strings) and a wrong one is a ConfigError naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

MAX_TEXT = 4096


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
    no_decay: bool = False
    """No weight decay on biases and normalisation weights (parameters of fewer than 2
    dimensions), as is usual for transformers."""


@dataclass
class ScheduleConfig:
    name: str = "constant"
    """constant; linear or cosine decay from the peak to min_lr; warmup_linear and
    warmup_cosine, the same after a linear warmup."""
    warmup_steps: int = 0
    """Steps of linear warmup (warmup_* only)."""
    min_lr: float = 0.0
    """Learning rate reached at the end of the decay, and kept after it."""
    decay_steps: int = 0
    """The step the decay ends at (0: `steps`), so a run can decay over another horizon."""


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
class OuterOptimizerConfig:
    name: str = "sgd"
    """diloco: the outer optimizer of the global parameters (only sgd)."""
    lr: float = 0.7
    """diloco: outer learning rate (> 0), applied to the averaged pseudo-gradient."""
    momentum: float = 0.9
    """diloco: outer SGD momentum, in [0, 1)."""
    nesterov: bool = True
    """diloco: outer Nesterov momentum (with momentum 0 it is plain SGD)."""


@dataclass
class StrategyConfig:
    name: str = "sync"
    """The training strategy (nimble_worker/strategies): sync, one optimizer step of the
    global batch per round, its gradient all-reduced through `compression`; or diloco
    (DiLoCo / Streaming DiLoCo), rounds of local inner steps whose pseudo-gradients the
    outer optimizer applies to global parameters (`optimizer`, `lr_schedule`, `grad_clip`
    and `precision` are then the inner ones, `steps` counts inner steps, and
    `compression` is not used)."""
    orders_ahead: str = "auto"
    """sync: auto, on or off. On, step t+1's order may arrive before step t's decision: the
    worker then applies step t at once, keeping a snapshot of its state to undo it
    (snapshot.py). The coordinator chooses; the worker follows the orders' `ahead`."""
    inner_steps: int = 100
    """diloco: inner steps (H) after which every fragment has synced once (>= 1)."""
    outer_optimizer: OuterOptimizerConfig = field(default_factory=OuterOptimizerConfig)
    """diloco: the outer optimizer, one instance per fragment."""
    fragments: int = 1
    """diloco: the model's top-level modules split into this many contiguous groups of
    about equal size; one group syncs every inner_steps / fragments inner steps, in turn
    (Streaming DiLoCo; 1 is plain DiLoCo). Must divide inner_steps."""
    overlap_steps: int = 0
    """diloco: inner steps (tau) the fragment's all-reduce overlaps: its pseudo-gradient is
    taken this many inner steps before the sync point, in [0, inner_steps / fragments)."""
    alpha: float = 0.0
    """diloco: after the outer step the fragment's local weights become lerp(global, local,
    alpha), in [0, 1]: 0 takes the global ones (dropping the overlap steps' progress)."""
    codec: str = "none"
    """diloco: how pseudo-gradients travel: none (float32), fp16, bf16 or int8 (lossy,
    with error feedback)."""


PIPELINE_SCHEDULES = ("gpipe", "1f1b")
ACTIVATION_CODECS = ("none", "fp16", "bf16", "int8")


@dataclass
class ParallelConfig:
    pipeline_stages: int = 1
    """S: the model's top-level layers in this many contiguous stages (>= 1), each held by
    workers / S replicas (nimble_worker/pipeline, strategies/pipeline.py)."""
    micro_batches: int = 4
    """M: micro-batches each chain's share of a step flows through the stages in (>= 1)."""
    schedule: str = "1f1b"
    """gpipe (every forward, then every backward) or 1f1b (one forward one backward after a
    warmup: at most S - stage micro-batches' activations alive, Narayanan et al. 2021)."""
    activation_codec: str = "none"
    """How activations and their gradients travel between stages: none (their own dtype,
    exact), fp16, bf16 or int8 (blockwise absmax; lossy)."""


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
    grad_clip: float = 0.0
    """Clip the reduced gradient (the same on every replica) to this global L2 norm before
    each update; 0 leaves it as it is."""
    precision: str = "fp32"
    """Autocast on the worker's device: fp32 (none), bf16, or fp16 with a dynamic loss
    scale that every worker keeps the same (a step with an inf anywhere is skipped by all)."""
    prefetch: int = 2
    """Steps whose batches a background thread loads ahead (dataset items and collate), while
    this step computes and its gradient travels; 0 loads each batch when it is needed.
    Batches are the same either way (replica.py, "Prefetch")."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Periodic checkpoint settings."""
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """Gradient compression settings (nimble_worker/compress)."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """What one round is and what crosses the network (nimble_worker/strategies)."""
    parallel: ParallelConfig | None = None
    """Pipeline parallelism (None: none). When set the strategy is `pipeline`, whatever
    `strategy` says, and the model is initialised per layer from seeds (pipeline/split.py)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JobConfig":
        if not isinstance(d, dict):
            raise ConfigError("", f"the config must be a mapping, found {type(d).__name__}")
        cfg = _build(cls, d, "")
        cfg.optimizer.betas = tuple(float(b) for b in cfg.optimizer.betas)  # type: ignore[assignment]
        cfg.task_args = dict(cfg.task_args or {})
        if cfg.parallel is not None:
            validate_parallel(cfg.parallel)
        return cfg


def validate_parallel(p: ParallelConfig) -> None:
    """Values the types alone do not check; a ConfigError naming `parallel.<field>`."""
    if p.pipeline_stages < 1:
        raise ConfigError("parallel.pipeline_stages",
                          f"parallel.pipeline_stages: expected an integer >= 1, found {p.pipeline_stages}")
    if p.micro_batches < 1:
        raise ConfigError("parallel.micro_batches",
                          f"parallel.micro_batches: expected an integer >= 1, found {p.micro_batches}")
    for name, allowed in (("schedule", PIPELINE_SCHEDULES), ("activation_codec", ACTIVATION_CODECS)):
        v = getattr(p, name)
        if v not in allowed:
            raise ConfigError(f"parallel.{name}", f"parallel.{name}: expected one of "
                                                  f"{' | '.join(allowed)}, found {_kind(v)}")


SECTIONS = {"optimizer": OptimizerConfig, "lr_schedule": ScheduleConfig, "eval": EvalConfig,
            "checkpoint": CheckpointConfig, "compression": CompressionConfig, "strategy": StrategyConfig,
            "parallel": ParallelConfig}
NESTED = {"strategy.outer_optimizer": OuterOptimizerConfig}
"""Sections inside sections, by their dotted name."""


def _build(kind, d: dict[str, Any], prefix: str):
    """`kind` from the known keys of `d`, each checked against its field's type."""
    kw = {}
    for f in fields(kind):
        v = d.get(f.name)
        if v is None:
            continue
        where = f"{prefix}{f.name}"
        sub = SECTIONS.get(f.name) if kind is JobConfig else NESTED.get(where)
        if sub is not None:
            if not isinstance(v, dict):
                raise ConfigError(where, f"{where}: expected a mapping, found {_kind(v)}")
            kw[f.name] = _build(sub, v, f"{where}.")
        else:
            kw[f.name] = _checked(where, str(f.type), v)
    return kind(**kw)


def _checked(where: str, annotation: str, v: Any) -> Any:
    ok = {
        "str": lambda: isinstance(v, str) and len(v) <= MAX_TEXT,
        "bool": lambda: isinstance(v, bool),
        "int": lambda: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
        "float": lambda: _finite(v),
        "tuple[float, float]": lambda: isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_finite, v)),
        "dict[str, Any]": lambda: isinstance(v, dict),
    }[annotation]
    if not ok():
        want = {"str": f"a string of at most {MAX_TEXT} characters", "int": "an integer from 0 below 2^63",
                "float": "a finite number", "tuple[float, float]": "two finite numbers",
                "dict[str, Any]": "a mapping", "bool": "true or false"}[annotation]
        raise ConfigError(where, f"{where}: expected {want}, found {_kind(v)}")
    return v


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _kind(v: Any) -> str:
    return repr(v)[:60] if isinstance(v, (int, float, bool, str)) else type(v).__name__
