"""Gradient compression: how one step's gradients are summed over the workers.

A compressor gets this worker's gradients (one float32 tensor per trainable parameter,
already scaled by share / batch_size, so that their SUM over workers is the large-batch
mean gradient) and returns the reduced dense gradients, identical on every worker, or a
skipped step. It talks to the other workers only through a `Comm` (nimble_worker/comm.py).

Methods: none / fp16 / bf16 / int8 (`Dense` below), powersgd (`powersgd.py`, the default),
topk (`topk.py`). Every decision to skip a step is taken from reduced buffers, which are
the same on every worker, so all workers issue the same collectives and skip together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..comm import Comm, pack_into, staging, unpack_from
from ..config import CompressionConfig, ConfigError  # noqa: F401 - raised by compressors
from ..tensors import flat_cpu, unflat

METHODS = ("none", "fp16", "bf16", "int8", "powersgd", "topk")
CODECS = ("f32", "f16", "bf16", "int8", "int4")  # wire codecs of Comm.allreduce


@dataclass
class Reduced:
    grads: list[torch.Tensor] | None
    """The summed gradients (one per input, same shapes), or None for a skipped step."""
    nonfinite: list[str] = field(default_factory=list)
    """Names of this worker's non-finite input gradients."""
    allreduces: int = 0
    """How many collectives this step issued (the same on every worker)."""

    @property
    def skipped(self) -> bool:
        return self.grads is None


FINITE_CHUNK = 1 << 20
"""Elements checked at once: isfinite makes |t| and three masks of its input's size, so a
whole gradient at once would hold it 1.75 times more for the check (350 MB for 50M
parameters); a chunk at a time, a few MB."""


def finite(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(c).all()) for c in flat.split(FINITE_CHUNK))


def local_nonfinite(names: Sequence[str], grads: Sequence[torch.Tensor]) -> list[str]:
    return [n for n, g in zip(names, grads) if not finite(g)]


def dense_allreduce(comm: Comm, names, grads, codec: str, poison: bool) -> Reduced:
    """One all-reduce of every gradient packed into a flat buffer (the plain path). The
    buffer is the Comm's staging buffer (the one shared with the provider: the same memory
    every step, summed in place), and the sums go back into `grads` themselves, so the
    step holds the gradient twice at most, as DDP's buckets do."""
    bad = local_nonfinite(names, grads)
    buf = staging(comm, sum(g.numel() for g in grads))
    pack_into(buf, grads)
    if poison and buf.numel():
        buf[0] = math.nan  # make sure every worker sees this worker's bad step
    summed = comm.allreduce(buf, codec)
    if not finite(summed):
        return Reduced(None, bad, 1)
    unpack_from(summed, grads)
    return Reduced(list(grads), bad, 1)


class Compressor:
    """Base: subclasses override `reduce`, and the state methods if they keep state."""

    def __init__(self, cfg: CompressionConfig, comm: Comm):
        self.cfg, self.comm = cfg, comm

    def reduce(self, step: int, names: Sequence[str], grads: Sequence[torch.Tensor],
               share: float, poison: bool = False) -> Reduced:
        """Sum `grads` over the workers. `share` is this worker's share / batch_size;
        `poison` forces the step to be skipped everywhere (e.g. a non-finite loss). `grads`
        may be overwritten: the dense path puts the sums back into them (the returned
        gradients are then `grads` themselves)."""
        raise NotImplementedError

    def mark(self) -> Any:
        """What `rollback` needs to undo the next `reduce` (a step abandoned mid-way)."""
        return None

    def rollback(self, mark: Any) -> None:
        """Undo every state change since `mark()` was taken."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, same_worker: bool) -> None:
        """`same_worker`: the state was saved by this rank in a run of the same size, so
        its error-feedback memories (which are per worker) apply here."""


class Dense(Compressor):
    codec = {"none": "f32", "fp16": "f16", "bf16": "bf16", "int8": "int8"}

    def reduce(self, step, names, grads, share, poison=False):
        return dense_allreduce(self.comm, names, grads, self.codec[self.cfg.method], poison)


def validate(cfg: CompressionConfig) -> None:
    c = cfg
    if c.method not in METHODS:
        raise ConfigError("compression.method",
                          f"compression.method {c.method!r} is not one of {', '.join(METHODS)}")
    checks = [("rank", isinstance(c.rank, int) and c.rank >= 1, "an integer >= 1"),
              ("start_step", isinstance(c.start_step, int) and c.start_step >= 0,
               "an integer >= 0"),
              ("min_compression_rate", isinstance(c.min_compression_rate, (int, float))
               and c.min_compression_rate > 0, "a number > 0"),
              ("ratio", isinstance(c.ratio, (int, float)) and 0 < c.ratio <= 1, "in (0, 1]"),
              ("seed", isinstance(c.seed, int) and c.seed >= 0, "an integer >= 0")]
    for name, ok, want in checks:
        if not ok or isinstance(getattr(c, name), bool):
            raise ConfigError(f"compression.{name}",
                              f"compression.{name} {getattr(c, name)!r} must be {want}")


def build_compressor(cfg: CompressionConfig, comm: Comm,
                     named_shapes: Sequence[tuple[str, torch.Size]]) -> Compressor:
    validate(cfg)
    if cfg.method == "powersgd":
        from .powersgd import PowerSGD
        return PowerSGD(cfg, comm, named_shapes)
    if cfg.method == "topk":
        from .topk import TopK
        return TopK(cfg, comm, named_shapes)
    return Dense(cfg, comm)
