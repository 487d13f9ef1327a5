"""`sync`: synchronous data parallelism. One round is one optimizer step of the global
batch: every worker computes the gradient of its share, the compressor sums them over
the workers, and the update is applied on commit (docs/protocol.md, "Two-phase rounds")."""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch

from ..compress import Reduced, build_compressor
from ..link import LinkError
from ..snapshot import StateSnapshot
from .base import Strategy, average_buffers


class Sync(Strategy):
    name = "sync"
    orders = {"step": "step_done"}

    def __init__(self, cfg, replica, comm):
        super().__init__(cfg, replica, comm)
        self.compressor = build_compressor(cfg.compression, comm, replica.named_shapes())
        # The prepared step: (step, its reduced gradient, the compressor's mark from before
        # it, the buffers from before it: None when the model has none)
        self._pending: tuple[int, Reduced, Any, Any] | None = None
        # A step applied ahead of its decision (orders ahead): (step, the compressor's mark
        # and the buffers from before it); the replica's state from before it is in _snapshot.
        self._ahead: tuple[int, Any, Any] | None = None
        self._snapshot = StateSnapshot()
        self.commit_s = 0.0
        """Seconds the last commit took (reported with the next step's compute)."""

    @property
    def pending(self) -> int | None:
        """The oldest undecided step: one applied ahead, else the prepared one."""
        if self._ahead is not None:
            return self._ahead[0]
        return None if self._pending is None else self._pending[0]

    def prepare(self, order: dict) -> dict:
        if order.get("ahead") and self._pending is not None:
            self.apply_ahead(int(order["step"]))
        return self.prepare_step(int(order["step"]), [int(s) for s in order["shares"]],
                                 bool(order.get("want_hash")))

    def prepare_step(self, t: int, shares: Sequence[int], want_hash: bool = False) -> dict:
        """Step t up to its reduced gradient. Every worker joins the same collectives, even
        with share 0 or a bad loss. A non-finite gradient (or loss) anywhere skips the
        update on every worker: no optimizer step and no compressor state change, but the
        schedule and the step counter advance, and the report says `skipped`. With
        `want_hash`, `hash` is of the parameters before this step's update."""
        if self._pending is not None:
            raise RuntimeError(f"step {self._pending[0]} is neither committed nor aborted")
        replica, compressor = self.replica, self.compressor
        assert compressor is not None
        hash_before = replica.hash() if want_hash else None
        lr = replica.lr
        t0 = time.perf_counter()
        saved_buffers = replica.buffers_snapshot() if replica.buffers else None
        loss_value, grads = replica.grads(t, shares, self.loss_totals)
        # Forward/backward alone (what a share costs): the rest of compute_s (compression,
        # the optimizer) is about the same whatever the share, so it does not guide shares.
        t1 = time.perf_counter()
        self.comm.seconds = 0.0
        bad_loss = not math.isfinite(loss_value)
        mark = compressor.mark()
        try:
            if saved_buffers is not None:
                average_buffers(replica, self.comm, shares)
            res = compressor.reduce(t, replica.names, grads,
                                    shares[replica.rank] / self.cfg.batch_size, poison=bad_loss)
        except BaseException:  # the step leaves no trace: compressor, gradients, buffers
            compressor.rollback(mark)
            replica.drop_grads()
            if saved_buffers is not None:
                replica.restore_buffers(saved_buffers)
            raise
        self._pending = (t, res, mark, saved_buffers)
        if replica.device.type == "cuda":
            torch.cuda.synchronize(replica.device)
        t3 = time.perf_counter()
        comm_s = self.comm.seconds
        # The previous step's commit ran just before this one: its optimizer work counts here.
        commit_s, self.commit_s = self.commit_s, 0.0
        out = {"step": t, "loss": 0.0 if bad_loss else loss_value,
               "samples": int(shares[replica.rank]), "micro_batches": replica.micro_batches,
               "max_micro_batch": replica.max_micro_batch, "lr": lr,
               "compute_s": max(0.0, (t3 - t0) - comm_s) + commit_s, "comm_s": comm_s,
               "forward_backward_s": t1 - t0, "dense_count": replica.dense_count,
               "skipped": res.skipped}
        if res.skipped:
            out["nonfinite"] = (["loss"] if bad_loss else []) + res.nonfinite
        if hash_before is not None:
            out["hash"] = hash_before
        return out

    def commit(self) -> None:
        if self._pending is None:
            return
        t0 = time.perf_counter()
        t, res, _, _ = self._pending
        self._pending = None
        self.replica.apply(t, res.grads)
        self.commit_s += time.perf_counter() - t0

    def apply_ahead(self, next_step: int) -> None:
        """Orders ahead: the order for `next_step` came before the prepared step's decision.
        Apply that step now, keeping what undoes it, so that `next_step` starts at once; a
        worker holds at most two undecided steps (this one and `next_step`)."""
        assert self._pending is not None
        t, _, mark, saved_buffers = self._pending
        if self._ahead is not None:
            raise LinkError(f"step {next_step} ordered ahead while steps {self._ahead[0]} and {t} are "
                            "both undecided (at most two may be)")
        if next_step != t + 1:
            raise LinkError(f"step {next_step} ordered ahead of step {t}'s decision: only step {t + 1} may be")
        self._snapshot.take(self.replica)
        self._ahead = (t, mark, saved_buffers)
        self.commit()

    def decide(self, step: int, verdict: str) -> None:
        if self._ahead is None:
            return super().decide(step, verdict)
        if verdict not in ("commit", "abort"):
            raise LinkError(f"decision for step {step}: unknown verdict {verdict!r}")
        ahead = self._ahead[0]
        if step == ahead + 1 and verdict == "abort":
            self.abort()  # the later step only: the one applied ahead still awaits its own
            return
        if step != ahead:
            raise LinkError(f"decision for step {step}, but step {ahead} is the one applied ahead")
        if verdict == "commit":
            self._ahead = None
            return
        # Aborting a step also aborts the one after it.
        self.abort()
        _, mark, saved_buffers = self._ahead
        self._ahead = None
        self._snapshot.restore(self.replica)
        assert self.compressor is not None
        self.compressor.rollback(mark)
        if saved_buffers is not None:
            self.replica.restore_buffers(saved_buffers)

    def abort(self) -> int | None:
        if self._pending is None:
            return None
        t, _, mark, saved_buffers = self._pending
        self._pending = None
        assert self.compressor is not None
        self.compressor.rollback(mark)  # its memories and Q's moved on during the reduce
        self.replica.drop_grads()
        if saved_buffers is not None:  # the forward passes moved the running statistics on
            self.replica.restore_buffers(saved_buffers)
        return t

    def loss_totals(self, loss_sum: float, count: float) -> tuple[float, float]:
        """A (loss_sum, count) loss's sums over the workers (replica.grads asks for them)."""
        both = self.comm.allreduce(torch.tensor([loss_sum, count], dtype=torch.float32))
        return float(both[0]), float(both[1])
