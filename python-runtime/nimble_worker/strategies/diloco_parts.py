"""The pieces of `diloco` (strategies/diloco.py) that are not the round itself: the
config check, the per-rank state, an all-reduce that can overlap compute, and copies of
the replica's state to go back to."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from ..config import ConfigError, StrategyConfig
from ..replica import Replica

WIRE_CODECS = {"none": "f32", "fp16": "f16", "bf16": "bf16", "int8": "int8", "int4": "int4"}
"""strategy.codec -> the Comm's wire codec (the one place to add one)."""


def validate(s: StrategyConfig) -> None:
    """The diloco keys of `strategy` (their types are checked by config.py)."""
    o = s.outer_optimizer

    def need(ok: bool, name: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"strategy.{name}", f"strategy.{name} {message}")
    need(s.inner_steps >= 1, "inner_steps", f"{s.inner_steps} must be at least 1")
    need(s.fragments >= 1, "fragments", f"{s.fragments} must be at least 1")
    need(s.inner_steps % s.fragments == 0, "inner_steps",
         f"{s.inner_steps} must be a multiple of strategy.fragments ({s.fragments})")
    period = s.inner_steps // s.fragments
    need(s.overlap_steps < period, "overlap_steps",
         f"{s.overlap_steps} must be less than strategy.inner_steps / strategy.fragments "
         f"({period}): a fragment's all-reduce must end within its round")
    need(0 <= s.alpha <= 1, "alpha", f"{s.alpha} must be in [0, 1]")
    need(s.codec in WIRE_CODECS, "codec", f"{s.codec!r} is not one of {', '.join(WIRE_CODECS)}")
    need(o.name == "sgd", "outer_optimizer.name", f"{o.name!r} is not one of sgd")
    need(o.lr > 0, "outer_optimizer.lr", f"{o.lr} must be > 0")
    need(0 <= o.momentum < 1, "outer_optimizer.momentum", f"{o.momentum} must be in [0, 1)")


def copy_state(obj: Any, device: str = "cpu") -> Any:
    """A deep copy of a state dict with its tensors copied to `device`: the live state
    moves on, the copy stays (kept off the accelerator, like torchft's backups)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, dict):
        return {k: copy_state(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(copy_state(v, device) for v in obj)
    return obj


class RankState:
    """DiLoCo's per-rank state, which checkpoints keep per rank (compressor.pt; this is
    the strategy's `compressor`): this replica's local weights, inner optimizer and loss
    scale, which differ between replicas by design (the rest of a checkpoint is one
    rank's), and the error-feedback memory of a lossy codec, per fragment."""

    def __init__(self, replica: Replica):
        self.replica = replica
        self.memory: dict[int, torch.Tensor] = {}
        """fragment -> what the codec dropped of this worker's contributions (flat float32 CPU)."""

    def state_dict(self) -> dict:
        r = self.replica
        return {"method": "diloco",
                "local": {n: p.detach().clone() for n, p in zip(r.names, r.trainable)},
                "optimizer": r.optimizer.state_dict(), "loss_scale": r.loss_scale.state_dict(),
                "memory": {k: v.clone() for k, v in self.memory.items()}}

    def shared_state_dict(self) -> dict:
        """What a joiner takes (checkpoint.state_blob): nothing of this rank's own; its
        local weights and inner optimizer come with the replica's state."""
        return {"method": "diloco"}

    def load_state_dict(self, state: dict, same_worker: bool) -> None:
        """With `same_worker` (this rank's state, same world size), its local weights,
        inner optimizer and memories; otherwise the replica keeps the state it loaded
        (the checkpointed rank's, or the source's) and the memories start empty."""
        self.memory = {}
        if not same_worker or state.get("method") != "diloco":
            return
        r = self.replica
        with torch.no_grad():
            for n, p in zip(r.names, r.trainable):
                p.copy_(state["local"][n])
        r.optimizer.load_state_dict(state["optimizer"])
        r.loss_scale.load_state_dict(state.get("loss_scale"))
        self.memory = {int(k): v.to("cpu", torch.float32).clone() for k, v in state["memory"].items()}

    def mark(self) -> Any:
        return {k: v.clone() for k, v in self.memory.items()}

    def rollback(self, mark: Any) -> None:
        self.memory = {k: v.clone() for k, v in mark.items()}


class Transfer:
    """One all-reduce of a flat float32 CPU buffer: on a thread of its own when it may
    overlap the inner steps still to run (the main thread does not use the Comm
    meanwhile), else at once. `result` gives the sum, or raises what the Comm raised."""

    def __init__(self, comm, buf: torch.Tensor, codec: str, background: bool):
        self.started = time.perf_counter()
        self.ended = self.started
        self.out: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        if background:
            self.thread = threading.Thread(target=self._run, args=(comm, buf, codec),
                                           name="diloco-allreduce", daemon=True)
            self.thread.start()
        else:
            self._run(comm, buf, codec)

    def _run(self, comm, buf: torch.Tensor, codec: str) -> None:
        try:
            self.out = comm.allreduce(buf, codec)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self.error = err
        finally:
            self.ended = time.perf_counter()

    def result(self) -> tuple[torch.Tensor, float, float]:
        """(the sum, seconds waited for it from here, seconds it ran while compute went on)."""
        asked = time.perf_counter()
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.out is not None
        if self.thread is None:
            return self.out, self.ended - self.started, 0.0
        return self.out, max(0.0, self.ended - asked), max(0.0, min(self.ended, asked) - self.started)
