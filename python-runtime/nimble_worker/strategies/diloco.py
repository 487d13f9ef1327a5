"""`diloco`: DiLoCo and Streaming DiLoCo (arXiv 2311.08105, 2501.18512), with the
semantics of torchft's DiLoCo, whose recorded histories tests/test_diloco.py reproduces
bit for bit.

Every worker trains its own local copy of the model with the job's optimizer (the inner
one: `optimizer`, `lr_schedule`, `grad_clip`, `precision`), on its share of each global
batch. Every replica also keeps the same global parameters and, per fragment (a group of
the model's top-level modules, strategies/fragments.py), an outer optimizer. A round is
P = inner_steps / fragments inner steps; at its end fragment k = round % fragments syncs:

- its pseudo-gradient global_k - local_k, with local_k taken overlap_steps (tau) inner
  steps before the end, so that its all-reduce runs while those tau steps compute;
- averaged over the workers weighted by their shares (a lossy codec's error goes into
  a per-worker memory added to the next contribution);
- the outer optimizer's gradient for global_k; then local_k = lerp(global_k, local_k,
  alpha), local_k being the weights after the tau steps.

Two phases (docs/protocol.md, "Two-phase rounds"): `prepare` runs the inner steps and
the all-reduce, `commit` the outer step. An abort puts the replica back at the round
start but keeps the finished inner steps aside ("held"): when the same round comes again
(a member was lost during the all-reduce), only the all-reduce is redone.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..comm import StepAborted
from ..compress import finite as is_finite, local_nonfinite
from ..compress.fake import encode
from ..link import LinkError
from ..tensors import flat_cpu, params_hash, unflat
from .base import Strategy, average_buffers
from .diloco_parts import WIRE_CODECS, RankState, Transfer, copy_state, validate
from .fragments import partition


@dataclass
class _Round:
    """A round this worker has trained: what its all-reduce, commit and abort need."""
    t0: int
    n: int
    share: int
    fragment: int
    start: dict
    """The replica's state at the round start (abort goes back to it)."""
    pg: torch.Tensor | None = None
    """The fragment's pseudo-gradient global - local, flat float32 CPU, unweighted."""
    after: dict | None = None
    """The replica's state after the inner steps, before the buffers' sync (held rounds)."""
    wire: torch.Tensor | None = None
    """What this worker's last all-reduce of it carried (weighted, plus the memory)."""
    own_buffers: list[torch.Tensor] | None = None
    """The buffers the inner steps left, before the sync averaged them."""
    trained: bool = False
    stats: dict = field(default_factory=lambda: {
        "loss_sum": 0.0, "loss_samples": 0, "samples": 0, "lr": 0.0, "compute_s": 0.0,
        "forward_backward_s": 0.0, "micro_batches": 0})


@dataclass
class _Pending:
    round: _Round
    reduced: torch.Tensor | None
    """The averaged pseudo-gradient, or None: non-finite, the outer step is skipped."""
    memory: torch.Tensor | None
    """The codec's error-feedback memory once this round is committed (lossy codecs)."""


class DiLoCo(Strategy):
    name = "diloco"
    orders = {"round": "round_done"}

    def __init__(self, cfg, replica, comm):
        super().__init__(cfg, replica, comm)
        s = cfg.strategy
        validate(s)
        self.period = s.inner_steps // s.fragments
        """P: inner steps per round."""
        self.overlap, self.alpha, self.codec = s.overlap_steps, float(s.alpha), WIRE_CODECS[s.codec]
        self.fragments = partition(replica.model, replica.names,
                                   [p.numel() for p in replica.trainable], s.fragments)
        """Per fragment, its trainable parameters (indices into replica.trainable)."""
        self.globals: list[torch.Tensor] | None = None
        """The global parameters (one per trainable parameter, on the replica's device);
        taken from the local ones at the first round (after the start's sync), or loaded."""
        self.outer: list[torch.optim.Optimizer] = []
        self.compressor = RankState(replica)
        self._pending: _Pending | None = None
        self._held: _Round | None = None
        self.commit_s = 0.0
        """Seconds the last commit took (reported with the next round's compute)."""

    @property
    def pending(self) -> int | None:
        return None if self._pending is None else self._pending.round.t0

    # ---- the round ----------------------------------------------------------------
    def prepare(self, order: dict) -> dict:
        """Round `order["step"]` up to its averaged pseudo-gradient; the report."""
        t0, shares = int(order["step"]), [int(s) for s in order["shares"]]
        n = int(order.get("steps", self.period))
        self._check_order(t0, n, shares)
        replica, total = self.replica, sum(shares)
        share = shares[replica.rank]
        weight, after = self._weights(shares, share)
        self._ensure_globals()
        hash_before = self.global_hash() if order.get("want_hash") else None
        commit_s, self.commit_s = self.commit_s, 0.0
        rnd = self._take_held(t0, n, share)
        try:
            if rnd is None:
                rnd = _Round(t0, n, share, (t0 // self.period) % len(self.fragments),
                             start=copy_state(replica.state_dict()))
                summed, comm_s, hidden_s = self._train(rnd, shares, weight)
            else:  # the same round again: its inner steps are done, redo the all-reduce
                self._restore(rnd.after)
                summed, comm_s, hidden_s = self._transfer(rnd, weight, background=False).result()
            if after != 1.0:
                summed = summed * after
            rnd.own_buffers = replica.buffers_snapshot() if replica.buffers else None
            t = time.perf_counter()
            if rnd.own_buffers is not None:
                average_buffers(replica, self.comm, shares)
            comm_s += time.perf_counter() - t
        except BaseException as err:
            if rnd is not None:
                self._back_to_start(rnd, hold=isinstance(err, StepAborted) and rnd.trained)
            raise
        return self._report(rnd, summed, commit_s, comm_s, hidden_s, hash_before)

    @staticmethod
    def _weights(shares: Sequence[int], share: int) -> tuple[float, float]:
        """(this worker's weight in the all-reduce, the factor applied to the sum): the
        share-weighted mean; with equal shares a plain sum over the workers with a share,
        divided by their count, as torchft averages (bit for bit, whatever their number)."""
        active = [s for s in shares if s > 0]
        if not active:
            return 0.0, 1.0
        if len(set(active)) == 1:
            return (1.0 if share > 0 else 0.0), 1.0 / len(active)
        return share / sum(active), 1.0

    def _check_order(self, t0: int, n: int, shares: Sequence[int]) -> None:
        if self._pending is not None:
            raise RuntimeError(f"round {self._pending.round.t0} is neither committed nor aborted")
        if t0 % self.period or n != self.period:
            raise LinkError(f"round of steps {t0} .. {t0 + n - 1}: a diloco round is "
                            f"{self.period} inner steps from a multiple of {self.period}")
        if self.replica.next_step != t0:
            raise LinkError(f"round from step {t0}, but this replica is at step {self.replica.next_step}")
        if len(shares) <= self.replica.rank:
            raise LinkError(f"got {len(shares)} shares, none for rank {self.replica.rank}")

    def _train(self, rnd: _Round, shares: Sequence[int], weight: float):
        """The round's inner steps, the fragment's all-reduce launched tau steps before the
        end (on a thread while those steps compute; at the end when tau is 0). Returns
        (the sum, seconds waited on it, seconds it was hidden behind compute)."""
        replica, transfer = self.replica, None
        started = time.perf_counter()
        for t in range(rnd.t0, rnd.t0 + rnd.n):
            self._inner_step(t, shares, rnd.stats)
            if t == rnd.t0 + rnd.n - 1 - self.overlap:
                rnd.pg = self._pseudo_gradient(rnd.fragment)
                if self.overlap:
                    transfer = self._transfer(rnd, weight, background=True)
        if replica.device.type == "cuda":
            torch.cuda.synchronize(replica.device)
        rnd.stats["compute_s"] = time.perf_counter() - started
        rnd.trained = True
        if transfer is None:
            transfer = self._transfer(rnd, weight, background=False)
        return transfer.result()

    def _inner_step(self, t: int, shares: Sequence[int], stats: dict) -> None:
        """Inner step t on this worker's share, the mean gradient of its own samples
        (inner steps are local). A non-finite loss or gradient skips the update here."""
        replica = self.replica
        share = shares[replica.rank]
        stats["lr"] = replica.lr
        if share == 0:  # trains nothing; the schedule and the step counter still advance
            scale = replica.loss_scale.state_dict()
            replica.apply(t, None)
            replica.loss_scale.load_state_dict(scale)  # nothing overflowed: keep the scale
            return
        began = time.perf_counter()
        loss, grads = replica.grads(t, shares)
        stats["forward_backward_s"] += time.perf_counter() - began
        stats["micro_batches"] += replica.micro_batches
        stats["samples"] += share
        if replica.loss_form == "mean":  # scaled by share / batch_size for a global sum
            for g in grads:
                g.mul_(self.cfg.batch_size / share)
        finite = math.isfinite(loss) and all(is_finite(g) for g in grads)
        if not finite:
            replica.apply(t, None)
            return
        stats["loss_sum"] += loss * share
        stats["loss_samples"] += share
        replica.apply(t, grads)

    def _pseudo_gradient(self, k: int) -> torch.Tensor:
        assert self.globals is not None
        return flat_cpu([self.globals[i].float() - self.replica.trainable[i].detach().float()
                         for i in self.fragments[k]])

    def _transfer(self, rnd: _Round, weight: float, background: bool) -> Transfer:
        """Start the all-reduce of this worker's weighted pseudo-gradient, plus the memory."""
        assert rnd.pg is not None
        buf = rnd.pg * weight
        memory = self.compressor.memory.get(rnd.fragment)
        if memory is not None:
            buf += memory
        rnd.wire = buf
        return Transfer(self.comm, buf, self.codec, background)

    def _report(self, rnd: _Round, summed: torch.Tensor, commit_s: float, comm_s: float,
                hidden_s: float, hash_before: str | None) -> dict:
        """Pend the round (its commit applies it) and report it."""
        st, k = rnd.stats, rnd.fragment
        finite = is_finite(summed)
        memory = None
        if finite and self.codec != "f32":  # what the wire dropped goes into the next round
            assert rnd.wire is not None
            memory = rnd.wire - encode(rnd.wire, self.codec)
        self._pending = _Pending(rnd, summed if finite else None, memory)
        out = {"step": rnd.t0, "steps": rnd.n,
               "loss": st["loss_sum"] / st["loss_samples"] if st["loss_samples"] else 0.0,
               "samples": st["samples"], "lr": st["lr"],
               "outer_lr": self.outer[k].param_groups[0]["lr"], "fragment": k,
               "compute_s": st["compute_s"] + commit_s, "comm_s": comm_s, "hidden_s": hidden_s,
               "forward_backward_s": st["forward_backward_s"],
               "micro_batches": st["micro_batches"], "max_micro_batch": self.replica.max_micro_batch,
               "dense_count": summed.numel(), "model_count": self.replica.dense_count,
               "skipped": not finite}
        if not finite:
            idx = self.fragments[k]
            assert rnd.pg is not None
            out["nonfinite"] = local_nonfinite([self.replica.names[i] for i in idx],
                                               unflat(rnd.pg, [self.replica.trainable[i] for i in idx]))
        if hash_before is not None:
            out["hash"] = hash_before
        return out

    # ---- the decision ---------------------------------------------------------------
    def commit(self) -> None:
        """The outer step on the fragment's global parameters, then its local weights
        become lerp(global, local, alpha) (the global ones when the step was skipped)."""
        if self._pending is None:
            return
        began = time.perf_counter()
        p, self._pending = self._pending, None
        assert self.globals is not None
        k, idx = p.round.fragment, self.fragments[p.round.fragment]
        with torch.no_grad():
            if p.reduced is not None:
                params = [self.globals[i] for i in idx]
                for g, chunk in zip(params, unflat(p.reduced, params)):
                    g.grad = chunk.to(g.dtype)
                self.outer[k].step()
                self.outer[k].zero_grad(set_to_none=True)
                if p.memory is not None:
                    self.compressor.memory[k] = p.memory
            for i in idx:
                local, g = self.replica.trainable[i], self.globals[i]
                local.copy_(torch.lerp(g, local, self.alpha) if p.reduced is not None else g)
        self.commit_s += time.perf_counter() - began

    def abort(self) -> int | None:
        if self._pending is None:
            self._held = None  # a state load follows: nothing trained before it applies
            return None
        p, self._pending = self._pending, None
        self._back_to_start(p.round, hold=True)
        return p.round.t0

    def _back_to_start(self, rnd: _Round, hold: bool) -> None:
        """The replica back at the round start; with `hold`, the trained round kept aside."""
        if hold:
            if rnd.after is None:
                if rnd.own_buffers is not None:  # as the inner steps left them, unsynced
                    self.replica.restore_buffers(rnd.own_buffers)
                rnd.after = copy_state(self.replica.state_dict())
            self._held = rnd
        self._restore(rnd.start)

    def _restore(self, saved: dict) -> None:
        # A copy: an optimizer may take the saved tensors as its own state (on the CPU
        # it does) and move them on in place, and a held round may be needed again.
        self.replica.load_state_dict(copy_state(saved))

    def _take_held(self, t0: int, n: int, share: int) -> _Round | None:
        """The held round, if it is this one (same steps, same share) and the replica is
        still where it started (nothing loaded since); else it is dropped."""
        held, self._held = self._held, None
        if held is None or (held.t0, held.n, held.share) != (t0, n, share):
            return None
        start = held.start["model"]
        same = all(torch.equal(p.detach().cpu(), start[name])
                   for name, p in zip(self.replica.names, self.replica.trainable))
        return held if same else None

    # ---- global parameters ----------------------------------------------------------
    def _ensure_globals(self) -> None:
        if self.globals is None:
            self._set_globals([p.detach().clone() for p in self.replica.trainable])

    def _set_globals(self, tensors: list[torch.Tensor]) -> None:
        o = self.cfg.strategy.outer_optimizer
        self.globals = tensors
        self.outer = [torch.optim.SGD([tensors[i] for i in idx], lr=o.lr, momentum=o.momentum,
                                      nesterov=o.nesterov and o.momentum > 0)
                      for idx in self.fragments]

    def shared_hash(self) -> str:
        return self.global_hash() if self.globals is not None else self.replica.hash()

    def global_hash(self) -> str:
        """Of the global parameters (frozen ones as they are) and the buffers: the same on
        every replica, whose local weights differ by design."""
        assert self.globals is not None
        index = {id(p): i for i, p in enumerate(self.replica.trainable)}
        return params_hash([self.globals[index[id(p)]] if id(p) in index else p
                            for p in self.replica.params] + self.replica.buffers)

    @contextlib.contextmanager
    def evaluation_params(self) -> Iterator[None]:
        """The global parameters in the model (evaluation, final weights); local back after."""
        if self.globals is None:  # before the first round they are the local ones
            yield
            return
        trainable = self.replica.trainable
        local = [p.detach().clone() for p in trainable]
        with torch.no_grad():
            for p, g in zip(trainable, self.globals):
                p.copy_(g)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(trainable, local):
                    p.copy_(saved)

    # ---- state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What every replica shares: the global parameters and the outer optimizers."""
        self._ensure_globals()
        assert self.globals is not None
        names = self.replica.names
        return {"global": {names[i]: g.detach().clone() for i, g in enumerate(self.globals)},
                "outer": [o.state_dict() for o in self.outer],
                "fragments": [[names[i] for i in idx] for idx in self.fragments]}

    def load_state_dict(self, state: dict) -> None:
        self._pending, self._held = None, None
        if not state:  # a peer or checkpoint of another strategy: start from the local ones
            self.globals = None
            return
        r = self.replica
        self._set_globals([state["global"][n].to(p.device, p.dtype).clone()
                           for n, p in zip(r.names, r.trainable)])
        if state.get("fragments") != [[r.names[i] for i in idx] for idx in self.fragments]:
            print("nimble_worker: the saved DiLoCo fragments differ from this run's; the outer "
                  "optimizers start afresh", file=sys.stderr, flush=True)
            return
        o = self.cfg.strategy.outer_optimizer
        for opt, saved in zip(self.outer, state["outer"]):
            opt.load_state_dict(saved)
            for group in opt.param_groups:  # the config's settings, the saved momentum
                group.update(lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
