"""A thin facade for scripts and tests: one replica, its strategy and a Comm in one object.

Workers do not use it (`__main__` composes the same parts). `comm` is a `comm.Comm` or a
plain callable `allreduce(buf) -> summed buf` (a flat float32 CPU tensor in, the
elementwise sum over all workers out).
"""

from __future__ import annotations

from typing import Sequence

from .checkpoint import load_checkpoint, load_state_blob, state_blob, state_files
from .comm import TimedComm, as_comm
from .config import JobConfig
from .handoff import sync_params, sync_state
from .pipeline.stage_replica import build_replica
from .strategies import build_strategy
from .task import Task


class Trainer:
    def __init__(self, cfg: JobConfig, task: Task, rank: int, world_size: int, device: str,
                 comm, max_micro_batch: int | None = None, speed: float = 1.0,
                 pipeline: dict | None = None):
        self.cfg = cfg
        self.comm = TimedComm(as_comm(comm, world_size))
        # With `parallel` in the config: the stage `pipeline` names (init's header; None: 0 of 1)
        self.replica = build_replica(cfg, task, rank, world_size, device, pipeline, max_micro_batch, speed)
        self.strategy = build_strategy(cfg, self.replica, self.comm)

    # The parts tests and scripts read.
    @property
    def model(self):
        return self.replica.model

    @property
    def params(self):
        return self.replica.params

    @property
    def optimizer(self):
        return self.replica.optimizer

    @property
    def compressor(self):
        return self.strategy.compressor

    @property
    def next_step(self) -> int:
        return self.replica.next_step

    @property
    def pending(self) -> int | None:
        return self.strategy.pending

    def describe(self) -> dict:
        return self.replica.describe()

    def hash(self) -> str:
        return self.replica.hash()

    def set_speed(self, speed) -> None:
        self.replica.speed.set(speed)

    # Rounds (sync: one step each).
    def prepare(self, t: int, shares: Sequence[int], want_hash: bool = False, **order) -> dict:
        """Round t (more of the order, e.g. a pipeline's `chains`, in `order`)."""
        return self.strategy.prepare({"step": t, "shares": list(shares), "want_hash": want_hash, **order})

    def commit(self) -> None:
        self.strategy.commit()

    def abort(self) -> int | None:
        return self.strategy.abort()

    def step(self, t: int, shares: Sequence[int], want_hash: bool = False) -> dict:
        """One step, applied at once (`prepare` then `commit`); `hash` is taken after it."""
        out = self.prepare(t, shares)
        self.commit()
        if want_hash:
            out["hash"] = self.hash()
        return out

    def eval(self, start: int, count: int, batch_size: int) -> tuple[int, dict[str, float], dict[str, float]]:
        with self.strategy.evaluation_params():  # as the worker does (e.g. DiLoCo's global ones)
            return self.strategy.evaluate(start, count, batch_size, {})

    # Replicas made equal, and state.
    def sync(self, source: int = 0) -> str:
        return sync_params(self.replica, self.comm, source)

    def sync_state(self, source: int) -> str:
        self.commit()
        return sync_state(self.replica, self.strategy, self.strategy.handoff_comm(self.comm), source)

    def state_blob(self) -> bytes:
        self.commit()
        return state_blob(self.replica, self.strategy)

    def load_blob(self, blob: bytes) -> None:
        load_state_blob(self.replica, self.strategy, blob)

    def state(self, kind: str) -> list[tuple[str, bytes]]:
        return state_files(self.replica, self.strategy, kind)

    def load_state(self, files: dict[str, bytes]) -> int:
        return load_checkpoint(self.replica, self.strategy, files)
