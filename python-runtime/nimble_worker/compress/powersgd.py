"""PowerSGD (Vogels et al. 2019) with the semantics of torch's `powerSGD_hook`
(torch/distributed/algorithms/ddp_comm_hooks/powerSGD_hook.py), restated for Nimble:

- Steps before `start_step`: one plain float32 all-reduce of everything; no state touched.
- From then on, error feedback (like torch) covers the WHOLE gradient, not only the
  compressed matrices: input x = grad + memory for every parameter.
- Each gradient of 2+ dims is viewed as M (shape[0], prod(rest)); with r = min(rank, n, m)
  it is compressed iff r (n + m) min_compression_rate < n m (torch's `_should_compress`).
  The rest (biases, small matrices) go in ONE uncompressed float32 all-reduce (left out
  when there is none).
- Q (m, r): warm start keeps last step's summed Q and orthogonalises it; otherwise (and the
  first time) Q is drawn from N(0, 1) by a generator seeded with `seed`, identical on every
  worker, then orthogonalised.
- P = M Q for all compressed matrices, concatenated into ONE all-reduce; each summed P is
  orthogonalised (Gram-Schmidt); Q = M^T P, ONE all-reduce; the result is P Q^T.
  All-reduces per step: uncompressed pack, P's, Q's.

Units. torch averages: each worker holds its local mean gradient g_i, the result is the
mean approximation A_mean, and its memory is e_i = (g_i + e_i) - A_mean. Nimble sums
scaled gradients: x_i = s_i g_i (+ memory), s_i = share_i / batch_size, sum_i s_i = 1, and
the result A approximates sum_i x_i. PowerSGD is linear in M up to the orthogonalisation,
which is scale-free, so A is torch's A_mean when shares are equal (s_i = 1/N, x_i = g_i/N).
The memory we keep is e_i = x_i - s_i A: with equal shares that is torch's memory / N (our
units), and for any shares sum_i e_i = sum_i x_i - A, the total residual of the step, so
the next step's sum of inputs is sum of gradients + everything compression left out so far.
That sum, hence the result, does not depend on how the batch is split between workers.
For the uncompressed tensors A = sum_i x_i exactly, so their memories sum to zero (as in
torch, where error = local - mean); they only move rounding between workers.

Non-finite gradients: the pack is checked after its all-reduce and the P's after theirs
(before orthogonalising), and the Q's after theirs; those buffers are identical on every
worker, so every worker stops at the same collective and the step is skipped everywhere
with memories, Q's and the generator left as they were. A worker that finds a non-finite
input (or is told to skip: a non-finite loss) puts a NaN in its first buffer (the pack, or
the P's when there is no pack), so the step is skipped at the first collective.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import (Comm, Compressor, ConfigError, Reduced, finite, flat_cpu, local_nonfinite,
               dense_allreduce)
from ..config import CompressionConfig


def should_compress(n: int, m: int, rank: int, min_rate: float) -> bool:
    r = min(rank, n, m)
    return r * (n + m) * min_rate < n * m


def orthogonalize_(a: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Modified Gram-Schmidt on the columns of a (n, r) in place, as torch's
    `_orthogonalize_gram_schmidt`. With eps 0 a zero column stays 0 (torch meant to do
    this in its ZeroDivisionError branch, but tensor division gives NaN instead)."""
    r = a.shape[1]
    for i in range(r):
        col = a[:, i:i + 1]
        norm = torch.linalg.vector_norm(col)
        if eps == 0:
            col.mul_(torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm)))
        else:
            col.div_(norm + eps)
        if i + 1 < r:
            rest = a[:, i + 1:]
            rest.sub_((col * rest).sum(dim=0, keepdim=True) * col)
    return a


class PowerSGD(Compressor):
    def __init__(self, cfg: CompressionConfig, comm: Comm,
                 named_shapes: Sequence[tuple[str, torch.Size]]):
        super().__init__(cfg, comm)
        self.mats: dict[str, tuple[int, int, int]] = {}  # name -> (n, m, r), compressed only
        # The largest rank any matrix worth compressing could take. A model with no such
        # matrix (a toy) just trains uncompressed, whatever the rank says.
        best = 0
        for name, shape in named_shapes:
            if len(shape) < 2:
                continue
            n, m = int(shape[0]), int(math.prod(shape[1:]))
            if should_compress(n, m, 1, cfg.min_compression_rate):
                best = max(best, min(n, m))
            if should_compress(n, m, cfg.rank, cfg.min_compression_rate):
                self.mats[name] = (n, m, min(cfg.rank, n, m))
        if best and cfg.rank > best:
            raise ConfigError("compression.rank",
                              f"compression.rank {cfg.rank} is larger than the smaller dimension "
                              f"of every weight matrix worth compressing (largest possible: {best})")
        self.memory: dict[str, torch.Tensor] = {}
        self.q: dict[str, torch.Tensor] = {}  # last step's summed Q (warm start)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def compressed_names(self) -> list[str]:
        return list(self.mats)

    def _initial_q(self, name: str, device: torch.device) -> torch.Tensor:
        n, m, r = self.mats[name]
        q = None
        if self.cfg.warm_start and name in self.q:
            q = orthogonalize_(self.q[name].clone())
            if not bool((torch.linalg.vector_norm(q, dim=0) > 0).all()):
                q = None  # a zero column would stay zero forever: draw a fresh Q
        if q is None:
            q = orthogonalize_(torch.randn(m, r, generator=self.gen, dtype=torch.float32))
        return q.to(device)

    def reduce(self, step, names, grads, share, poison=False):
        c = self.cfg
        if step < c.start_step:
            return dense_allreduce(self.comm, names, grads, "f32", poison)
        bad = local_nonfinite(names, grads)
        poison = poison or bool(bad)
        gen_state = self.gen.get_state()  # restored if the step is skipped
        xs = []
        for name, g in zip(names, grads):
            g = g.detach().to(torch.float32)
            if c.error_feedback and name in self.memory:
                g = g + self.memory[name].to(g.device)
            xs.append(g)
        comp = [i for i, name in enumerate(names) if name in self.mats]
        plain = [i for i, name in enumerate(names) if name not in self.mats]

        ms, qs, ps = {}, {}, {}
        for i in comp:
            n, m, r = self.mats[names[i]]
            ms[i] = xs[i].reshape(n, m)
            qs[i] = self._initial_q(names[i], xs[i].device)
            ps[i] = ms[i] @ qs[i]

        pack = flat_cpu([xs[i] for i in plain])
        p_buf = flat_cpu([ps[i] for i in comp])
        if poison:  # make sure the whole step is skipped everywhere, at the first check
            (pack if pack.numel() else p_buf).view(-1)[:1] = math.nan

        def skip(count):
            self.gen.set_state(gen_state)
            return Reduced(None, bad, count)

        # The uncompressed tensors travel with P in one all-reduce (torch's hook runs two):
        # on a link with latency that is one all-reduce's worth of round trips less a step.
        fused = torch.cat([pack, p_buf])
        n_ops = 0
        fused_sum = fused
        if fused.numel():  # (the same on every worker: the split depends only on the shapes)
            fused_sum = self.comm.allreduce(fused)
            n_ops += 1
            if not finite(fused_sum):
                return skip(n_ops)
        pack_sum, p_sum = fused_sum[:pack.numel()], fused_sum[pack.numel():]
        if not comp:
            return Reduced(self._finish(names, xs, plain, pack_sum, {}, share), bad, n_ops)
        at = 0
        for i in comp:
            n, m, r = self.mats[names[i]]
            ps[i] = orthogonalize_(p_sum[at:at + n * r].view(n, r).clone().to(xs[i].device))
            at += n * r
            qs[i] = ms[i].t() @ ps[i]
        q_sum = self.comm.allreduce(flat_cpu([qs[i] for i in comp]))
        n_ops += 1
        if not finite(q_sum):
            return skip(n_ops)
        approx, at = {}, 0
        for i in comp:
            n, m, r = self.mats[names[i]]
            q = q_sum[at:at + m * r].view(m, r).clone().to(xs[i].device)
            at += m * r
            if c.warm_start:
                self.q[names[i]] = q.cpu()
            approx[i] = (ps[i] @ q.t()).reshape(grads[i].shape)
        if not c.warm_start:
            self.q.clear()
        return Reduced(self._finish(names, xs, plain, pack_sum, approx, share), bad, n_ops)

    def _finish(self, names, xs, plain, pack_sum, approx, share):
        out: list[torch.Tensor] = [None] * len(xs)  # type: ignore[list-item]
        at = 0
        for i in plain:
            k = xs[i].numel()
            out[i] = pack_sum[at:at + k].view(xs[i].shape).to(xs[i].device)
            at += k
        for i, a in approx.items():
            out[i] = a
        if self.cfg.error_feedback:
            for name, x, o in zip(names, xs, out):
                self.memory[name] = x - share * o
        return out

    def mark(self):
        # reduce() replaces entries rather than changing tensors in place: shallow copies do.
        return dict(self.memory), dict(self.q), self.gen.get_state()

    def rollback(self, mark) -> None:
        memory, q, gen = mark
        self.memory, self.q = dict(memory), dict(q)
        self.gen.set_state(gen)

    def state_dict(self) -> dict:
        return {"method": "powersgd", "memory": {k: v.cpu() for k, v in self.memory.items()},
                "q": dict(self.q), "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict, same_worker: bool) -> None:
        if state.get("method") != "powersgd":
            return
        self.q = {k: v.to(torch.float32) for k, v in state["q"].items() if k in self.mats}
        self.gen.set_state(state["generator"])
        self.memory = {}
        if same_worker:
            self.memory = {k: v.to(torch.float32) for k, v in state["memory"].items()}
