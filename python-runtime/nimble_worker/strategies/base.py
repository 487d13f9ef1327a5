"""The worker side of a training strategy: what one round is, and its two-phase end.

A round is planned by the coordinator and arrives as an order (a worker-link header, e.g.
`step`). The strategy runs it up to the point where everything that needs the other
workers is done, and reports; the coordinator then decides: `commit` (apply the round:
every replica does) or `abort` (drop it: every replica does), and the decision arrives
on the next order (`decide`). So an update lands on every replica or on none, even when
a member is lost mid-round.

A new strategy is one file in this folder, registered in `__init__.py`, plus its
operations in the worker-link schema (src/protocol/workerOps.ts).
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, ContextManager, Sequence

import torch

from ..comm import TimedComm
from ..compress import Compressor
from ..config import JobConfig
from ..link import LinkError
from ..replica import Replica


class Strategy:
    name: ClassVar[str] = ""
    """The config's `strategy.name`."""
    orders: ClassVar[dict[str, str]] = {}
    """Worker-link orders this strategy runs with `prepare`, each with the reply op that
    carries the report (for sync: `step` -> `step_done`)."""

    def __init__(self, cfg: JobConfig, replica: Replica, comm: TimedComm):
        self.cfg, self.replica, self.comm = cfg, replica, comm
        self.compressor: Compressor | None = None
        """What carries this strategy's tensors, when it compresses them; its state is
        checkpointed apart (compressor.pt) because part of it is per worker."""

    @property
    def pending(self) -> int | None:
        """The step of the prepared round awaiting commit or abort, or None."""
        raise NotImplementedError

    def prepare(self, order: dict) -> dict:
        """Run the round that `order` asks for up to its decision; return the report. A
        collective raising StepAborted abandons the round: it must leave no trace."""
        raise NotImplementedError

    def commit(self) -> None:
        """Apply the prepared round (nothing when none is pending)."""
        raise NotImplementedError

    def abort(self) -> int | None:
        """Drop the prepared round; its step, or None when none was pending."""
        raise NotImplementedError

    def decide(self, step: int, verdict: str) -> None:
        """Apply the coordinator's decision for round `step` (docs/protocol.md, "Two-phase
        rounds"): `commit` applies it, `abort` drops it. With nothing prepared it is a
        no-op (a joiner never had the round; a decision may be flushed twice); a decision
        for another round than the prepared one is a protocol error."""
        if verdict not in ("commit", "abort"):
            raise LinkError(f"decision for step {step}: unknown verdict {verdict!r}")
        if self.pending is None:
            return
        if self.pending != step:
            raise LinkError(f"decision for step {step}, but step {self.pending} is the one prepared")
        if verdict == "commit":
            self.commit()
        else:
            self.abort()

    def shared_hash(self) -> str:
        """Hash of what every replica holds the same (the coordinator compares them): the
        parameters and buffers under sync; a strategy whose replicas differ by design says
        what they share."""
        return self.replica.hash()

    def state_dict(self) -> dict:
        """State of this strategy that every replica shares (e.g. outer parameters and
        the outer optimizer), beyond the replica's own; empty when it has none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (from a checkpoint or a peer)."""

    def evaluate(self, start: int, count: int, batch_size: int,
                 order: dict) -> tuple[int, dict[str, float], dict[str, float]]:
        """The task's metrics over validation items start .. start+count-1 as (items,
        sums, counts) (`order`: the whole `eval` order): the replica's own evaluation here;
        a pipeline runs the items through its stages."""
        return self.replica.eval(start, count, batch_size)

    def handoff_comm(self, comm):
        """The Comm a state hand-off (handoff.sync_state) runs on: the whole ring here, a
        pipeline stage's replicas under pipeline parallelism."""
        return comm

    def evaluation_params(self) -> ContextManager[None]:
        """While inside, the model holds the parameters that evaluation and the final
        weights are taken from: the replica's own (here), or e.g. DiLoCo's global ones,
        the local ones put back on leaving."""
        return contextlib.nullcontext()


def average_buffers(replica, comm, shares: Sequence[int]) -> None:
    """Make the buffers agree on every replica, in one all-reduce: floating ones become
    the share-weighted mean of what each worker's forward passes left (a worker with
    share 0 ran none and weighs nothing), the others (counters such as BatchNorm's
    num_batches_tracked) are those of the first worker with a share."""
    total = sum(shares)
    first = next((r for r, s in enumerate(shares) if s > 0), 0)
    weight = shares[replica.rank] / total if total else 0.0
    parts = [(b.detach().to("cpu", torch.float64) * (weight if b.is_floating_point() else
              float(replica.rank == first))).reshape(-1) for b in replica.buffers]
    summed = comm.allreduce(torch.cat(parts).to(torch.float32))
    with torch.no_grad():
        at = 0
        for b in replica.buffers:
            n = b.numel()
            b.copy_(summed[at:at + n].view(b.shape).to(b.dtype))
            at += n
