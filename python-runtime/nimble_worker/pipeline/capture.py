"""Running one stage inside the task's own loss and metrics, without knowing its batch
format.

The first stage runs `task.loss(HeadCapture(stage), batch)`: the task's compute_loss (or
Nimble's default) calls the model on its inputs as it always does; HeadCapture runs the
stage on them, keeps the output and unwinds with a private exception, so nothing after
the model call runs. The last stage runs `task.loss(Tail(stage, activation), batch)`:
Tail ignores the inputs it is called with and runs the stage on the activation that came
from the previous stage, so the task's loss sees the whole model's output. The same for
evaluation (`task.metric_sums`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..task import Task, TaskError


class _Captured(BaseException):
    """Unwinds the task's function once the model was called (a BaseException, so that
    neither Task._call nor the task's own `except Exception` catches it)."""


class HeadCapture(nn.Module):
    """Stands for the model in the first stage: runs `inner` (None: nothing) on what the
    task calls the model with, keeps both, and stops the task's function there."""

    def __init__(self, inner: nn.Module | None):
        super().__init__()
        self.inner = inner
        self.args: tuple[tuple, dict] | None = None
        self.output: Any = None

    def forward(self, *a, **kw):
        self.args = (a, kw)
        self.output = self.inner(*a, **kw) if self.inner is not None else None
        raise _Captured()


class Tail(nn.Module):
    """Stands for the model in the last stage: whatever it is called with, it returns
    `inner(activation)`; the output is kept too."""

    def __init__(self, inner: nn.Module, activation: Any):
        super().__init__()
        self.inner = inner
        self.activation = activation
        self.output: Any = None

    def forward(self, *a, **kw):
        self.output = self.inner(self.activation)
        return self.output


def head(task: Task, run: Callable[[nn.Module], Any], inner: nn.Module | None,
         fn: str = "compute_loss") -> HeadCapture:
    """`run(capture)` (e.g. lambda m: task.loss(m, batch)) up to the model call; the capture
    then holds the inputs and the output. A TaskError if the task never called the model."""
    cap = HeadCapture(inner)
    try:
        run(cap)
    except _Captured:
        return cap
    raise TaskError("returned without calling the model; a pipeline's first stage gets its "
                    "inputs from that call", task.where(fn))


def nbytes(x: Any) -> int:
    """Bytes of the tensors in `x` (a tensor, or tensors in tuples, lists and dicts)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(nbytes(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(nbytes(v) for v in x)
    return 0


class SavedBytes:
    """Bytes autograd saves for backward, per key (a micro-batch), measured with
    saved_tensors_hooks: a storage counts once per key, the parameters' never (they are
    alive anyway). `alive` is what the keys not yet released hold; `peak` its maximum."""

    def __init__(self, params=()):
        self.skip = {_storage(p)[0] for p in params}
        self.alive = 0
        self.peak = 0
        self._keys: dict[Any, dict[int, int]] = {}

    def hooks(self, key: Any):
        seen = self._keys.setdefault(key, {})

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr, size = _storage(t)
            if ptr not in self.skip and ptr not in seen:
                seen[ptr] = size
                self.alive += size
                self.peak = max(self.peak, self.alive)
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def held(self, key: Any) -> int:
        return sum(self._keys.get(key, {}).values())

    def release(self, key: Any) -> None:
        self.alive -= sum(self._keys.pop(key, {}).values())

    def reset(self) -> None:
        self._keys.clear()
        self.alive = self.peak = 0


def _storage(t: torch.Tensor) -> tuple[int, int]:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):  # no plain storage (e.g. a tensor subclass)
        return id(t), t.numel() * t.element_size()
