"""`pipeline`: pipeline parallelism (chosen by the config's `parallel`, whatever
`strategy` says). The model's layers are split into S stages; this worker holds one
(pipeline/stage_replica.py). One round is one optimizer step of the global batch:

- the order (`pipe_step`) names `chains`: chains[d][s] is the rank serving stage s of
  chain d, and shares[d] the samples chain d takes, at the positions data.GlobalSampler
  gives "rank" d. A worker serves every chain naming it at its stage, one after another
  in ascending d, each with the whole schedule (several chains: after a fault);
- a chain's share flows through its stages in M micro-batches (pipeline/schedule.py:
  gpipe or 1f1b). Per forward the activation comes from the previous stage and goes to
  the next (`f:t:d:mb`), per backward its gradient comes back (`b:t:d:mb`), packed by
  `parallel.activation_codec` (pipeline/codec.py). Stage 0 and the last stage run the
  task's own loss around the stage (pipeline/capture.py);
- then every worker joins one whole-ring all-reduce of (loss sum, count, sum form) that
  the last stages fill in: the global loss, and for a (loss_sum, count) loss the count
  every stage divides its gradient by; the stage's replicas all-reduce its gradient
  (group "stage", through the configured compressor: `compression`); and one more
  whole-ring all-reduce of (the squared norm of each stage's gradient, from one holder of
  each, and a non-finite flag) makes grad_clip use the norm over every stage and every
  stage skip a step together;
- the update is applied on commit; an abort leaves no trace (docs/protocol.md, "Two-phase
  rounds"), as under sync.

The same weights and the same updates as one worker holding every stage, up to the
order of floating-point sums (tests/test_pipeline.py). Buffers (BatchNorm's statistics)
are averaged over a stage's replicas, as sync averages them over every worker.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..comm import GroupComm, TimedComm
from ..compress import Reduced, build_compressor, local_nonfinite
from ..data import derive_seed
from ..link import LinkError
from ..pipeline.capture import SavedBytes, Tail, head
from ..pipeline.codec import pack, unpack
from ..pipeline.profile import resident_bytes
from ..pipeline.schedule import actions, micro_sizes
from ..pipeline.stage_replica import StageReplica
from ..precision import autocast
from ..task import LossTerm, TaskError
from ..tensors import to_device
from .base import Strategy

MAX_ACTIVATION_BYTES = 1 << 32
"""The largest activation a worker accepts from another (the link's payload limit)."""


@dataclass
class _Step:
    """What one step's micro-batches leave: losses and the figures of the report."""
    loss_sum: float = 0.0
    count: float = 0.0
    sum_form: bool = False
    samples: int = 0
    micro_batches: int = 0
    compute_s: float = 0.0
    send_s: float = 0.0
    recv_s: float = 0.0
    act_bytes_sent: int = 0
    timeline: list = field(default_factory=list)


@dataclass
class _Pending:
    step: int
    grads: list[torch.Tensor] | None
    """The reduced gradient to apply, or None: no update (skipped, or an idle worker)."""
    clip_coef: torch.Tensor | None
    skipped: bool
    """Every worker skips this step's update (its loss scale halves): non-finite somewhere."""
    mark: Any
    saved_buffers: list[torch.Tensor] | None


class Pipeline(Strategy):
    name = "pipeline"
    orders = {"pipe_step": "step_done"}

    def __init__(self, cfg, replica, comm: TimedComm):
        super().__init__(cfg, replica, comm)
        if not isinstance(replica, StageReplica):
            raise TypeError("the pipeline strategy needs a StageReplica (pipeline/stage_replica.py)")
        self.stage = replica
        p = cfg.parallel
        self.schedule = p.schedule if p is not None else "1f1b"
        self.micro_batches = p.micro_batches if p is not None else 1
        self.codec = p.activation_codec if p is not None else "none"
        self.stage_comm = GroupComm(comm, "stage", world_size=max(1, comm.world_size))
        """This stage's replicas: the gradient's all-reduce, the buffers', state hand-offs."""
        self.compressor = build_compressor(cfg.compression, self.stage_comm, replica.named_shapes())
        self._pending: _Pending | None = None
        self.commit_s = 0.0
        self.saved = SavedBytes(replica.params)

    @property
    def pending(self) -> int | None:
        return None if self._pending is None else self._pending.step

    def handoff_comm(self, comm):
        return GroupComm(comm, "stage", world_size=max(1, comm.world_size))

    # ---- the order ---------------------------------------------------------------
    def _chains(self, order: dict, n_shares: int | None) -> list[list[int]]:
        """The order's chains, checked; absent with one stage: chain d is rank d (as sync)."""
        chains = order.get("chains")
        S = self.stage.stages
        if chains is None:
            if S != 1:
                raise LinkError(f"{order.get('op', 'order')}: no chains for a pipeline of {S} stages")
            return [[d] for d in range(n_shares)] if n_shares is not None else [[self.stage.rank]]
        if not isinstance(chains, list) or not chains or not all(
                isinstance(c, list) and len(c) == S and all(isinstance(r, int) and not isinstance(r, bool)
                                                            and r >= 0 for r in c) for c in chains):
            raise LinkError(f"chains {chains!r} must be lists of {S} ranks (one per stage)")
        return chains

    def prepare(self, order: dict) -> dict:
        t = int(order["step"])
        shares = [int(x) for x in order["shares"]]
        chains = self._chains(order, len(shares))
        if len(chains) != len(shares):
            raise LinkError(f"{len(chains)} chains but {len(shares)} shares")
        if sum(shares) != self.cfg.batch_size or any(x < 0 for x in shares):
            raise LinkError(f"shares {shares} must be >= 0 and sum to {self.cfg.batch_size}")
        return self.prepare_step(t, chains, shares, bool(order.get("want_hash")))

    def prepare_step(self, t: int, chains: Sequence[Sequence[int]], shares: Sequence[int],
                     want_hash: bool = False) -> dict:
        if self._pending is not None:
            raise RuntimeError(f"step {self._pending.step} is neither committed nor aborted")
        replica, compressor = self.stage, self.compressor
        assert compressor is not None
        s, rank = replica.stage, replica.rank
        mine = [d for d, c in enumerate(chains) if c[s] == rank]
        holders = sorted({c[s] for c in chains})
        hash_before = replica.hash() if want_hash else None
        lr = replica.lr
        t0 = time.perf_counter()
        saved_buffers = replica.buffers_snapshot() if replica.buffers else None
        mark = compressor.mark()
        self.comm.seconds = 0.0
        self.saved.reset()
        st = _Step()
        replica.optimizer.zero_grad(set_to_none=True)
        replica.model.train()
        try:
            phase0 = time.perf_counter()
            for d in mine:
                self._run_chain(t, d, chains[d], shares, st)
            phase_s = time.perf_counter() - phase0
            # 1. the loss over every chain, and its form (only the last stages know them)
            both = self.comm.allreduce(torch.tensor(
                [st.loss_sum, st.count, 1.0 if st.sum_form else 0.0] if replica.last else [0.0, 0.0, 0.0],
                dtype=torch.float32))
            total_sum, total_count, sum_form = float(both[0]), float(both[1]), float(both[2]) > 0
            grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().to(torch.float32)
                     for p in replica.trainable]
            if sum_form:
                for g in grads:
                    g.mul_(1.0 / total_count if total_count > 0 else 0.0)
            loss = total_sum / total_count if total_count > 0 else (float("nan") if sum_form else 0.0)
            bad_loss = not math.isfinite(loss)
            # 2. the stage's gradient over its replicas (none to ask when it has one)
            if len(holders) > 1:
                self.stage_comm.world_size = len(set(holders) | {rank})
                if saved_buffers is not None:
                    self._average_buffers(st.samples, rank == chains[0][s])
                res = compressor.reduce(t, replica.names, grads, st.samples / self.cfg.batch_size,
                                        poison=bad_loss)
            else:
                bad = local_nonfinite(replica.names, grads)
                res = Reduced(None if bad or bad_loss else grads, bad, 0)
            # 3. the norm over every stage and whether any stage must skip
            sq = 0.0
            if rank == chains[0][s] and res.grads is not None and self.cfg.grad_clip > 0:
                unscale = 1.0 / replica.loss_scale.value
                norms = [torch.linalg.vector_norm(g * unscale if unscale != 1.0 else g, 2.0) for g in res.grads]
                sq = float(torch.stack(norms).double().square().sum()) if norms else 0.0
            flags = self.comm.allreduce(torch.tensor([sq, 1.0 if res.skipped else 0.0], dtype=torch.float32))
            skipped = bad_loss or float(flags[1]) > 0 or not math.isfinite(float(flags[0]))
            coef = None
            if self.cfg.grad_clip > 0 and not skipped:
                total_norm = torch.sqrt(flags[0:1].clone().reshape(()))
                coef = torch.clamp(self.cfg.grad_clip / (total_norm + 1e-6), max=1.0)
        except BaseException:  # the step leaves no trace: compressor, gradients, buffers
            compressor.rollback(mark)
            replica.drop_grads()
            self.saved.reset()
            if saved_buffers is not None:
                replica.restore_buffers(saved_buffers)
            raise
        idle = not mine and len(holders) <= 1  # it has no reduced gradient to apply
        self._pending = _Pending(t, None if skipped or idle else res.grads, coef, skipped, mark, saved_buffers)
        if replica.device.type == "cuda":
            torch.cuda.synchronize(replica.device)
        wall = time.perf_counter() - t0
        comm_s = self.comm.seconds
        commit_s, self.commit_s = self.commit_s, 0.0
        out = {"step": t, "loss": 0.0 if bad_loss else loss, "samples": st.samples,
               "micro_batches": st.micro_batches, "max_micro_batch": None, "lr": lr,
               "compute_s": max(0.0, wall - comm_s) + commit_s, "comm_s": comm_s,
               "forward_backward_s": st.compute_s, "dense_count": replica.dense_count,
               "skipped": skipped,
               "pipeline": {"stage": s, "chains": mine, "compute_s": st.compute_s,
                            "send_s": st.send_s, "recv_s": st.recv_s,
                            "bubble_s": max(0.0, phase_s - st.compute_s - st.send_s),
                            "peak_saved_bytes": int(self.saved.peak),
                            "act_bytes_sent": st.act_bytes_sent, "timeline": st.timeline,
                            "rss_bytes": resident_bytes()}}
        if skipped:
            out["nonfinite"] = (["loss"] if bad_loss else []) + res.nonfinite
        if hash_before is not None:
            out["hash"] = hash_before
        return out

    # ---- one chain's micro-batches ------------------------------------------------
    def _run_chain(self, t: int, d: int, chain: Sequence[int], shares: Sequence[int], st: _Step) -> None:
        replica, task, cfg = self.stage, self.stage.task, self.cfg
        s, first, last = replica.stage, replica.first, replica.last
        sizes = micro_sizes(shares[d], self.micro_batches)
        offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        loads = first or last
        indices = replica.sampler.indices(t, shares, d) if loads else []
        start = replica.sampler.start(t, shares, d)
        prev = chain[s - 1] if not first else None
        nxt = chain[s + 1] if not last else None
        held: dict[int, dict] = {}
        scale = replica.loss_scale.value
        st.samples += shares[d]
        for kind, mb in actions(self.schedule, s, replica.stages, len(sizes)):
            n = sizes[mb]
            if kind == "F":
                act = None
                if not first:
                    act = self._recv(prev, f"f:{t}:{d}:{mb}", st)
                    if act.is_floating_point():
                        act.requires_grad_(True)
                c0, w0 = time.perf_counter(), time.time()
                replica.speed.start()
                torch.manual_seed(derive_seed("pipe", cfg.seed, t, d, mb, s))
                batch = None
                if loads:
                    part = indices[offsets[mb]:offsets[mb] + n]
                    seeds = [("item", cfg.seed, start + offsets[mb] + j) for j in range(n)]
                    batch = to_device(task.load_batch("train", replica.train_ds, part, seeds), replica.device)
                entry: dict[str, Any] = {"inp": act}
                with self.saved.hooks((d, mb)), autocast(cfg.precision, replica.device):
                    if first and last:
                        entry["term"] = task.loss(replica.model, batch)
                    elif first:
                        entry["out"] = head(task, lambda m: task.loss(m, batch), replica.model).output
                    elif last:
                        entry["term"] = task.loss(Tail(replica.model, act), batch)
                    else:
                        entry["out"] = replica.model(act)
                if last:
                    term: LossTerm = entry["term"]
                    replica._note_loss_form(term)
                    st.sum_form = term.count is not None
                    st.loss_sum += float(term.value.detach()) * (n if term.count is None else 1)
                    st.count += n if term.count is None else term.count
                else:
                    self._check_activation(entry["out"])
                payload = None if last else pack(entry["out"].detach(), self.codec)
                replica.speed.stretch()
                st.compute_s += time.perf_counter() - c0
                st.timeline.append(["F", d, mb, w0, time.time()])
                if payload is not None:
                    self._send(nxt, f"f:{t}:{d}:{mb}", payload, st)
                held[mb] = entry
                st.micro_batches += 1
            else:
                entry = held.pop(mb)
                grad = None
                if not last:
                    grad = self._recv(nxt, f"b:{t}:{d}:{mb}", st)
                    if tuple(grad.shape) != tuple(entry["out"].shape):
                        raise LinkError(f"stage {s}: the gradient of micro-batch {mb} of chain {d} has "
                                        f"shape {tuple(grad.shape)}, its activation {tuple(entry['out'].shape)}")
                c0, w0 = time.perf_counter(), time.time()
                replica.speed.start()
                if last:
                    term = entry["term"]
                    weight = scale * n / cfg.batch_size if term.count is None else scale
                    root, root_grad = term.value.float() * weight, None
                else:
                    out = entry["out"]
                    root, root_grad = out, grad.to(out.device, out.dtype)
                if root.requires_grad:
                    torch.autograd.backward(root, root_grad)
                self.saved.release((d, mb))
                payload = None
                if not first:
                    inp = entry["inp"]
                    g = inp.grad if inp.grad is not None else torch.zeros_like(inp)
                    payload = pack(g.detach(), self.codec)
                del entry, root, root_grad
                replica.speed.stretch()
                st.compute_s += time.perf_counter() - c0
                st.timeline.append(["B", d, mb, w0, time.time()])
                if payload is not None:
                    self._send(prev, f"b:{t}:{d}:{mb}", payload, st)

    def _check_activation(self, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            got = f"a {out.dtype} tensor" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            lo, hi = self.stage.layers
            fn = "build_model" if self.stage.stage_model and self.stage.stage_model.sequential else "build_stages"
            raise TaskError(f"stage {self.stage.stage} (layers {lo} .. {hi - 1}) returned {got}; the "
                            "activation between pipeline stages must be a single floating-point tensor",
                            self.stage.task.where(fn))

    def _send(self, to: int, tag: str, payload: bytes, st: _Step) -> None:
        t0 = time.perf_counter()
        self.comm.send(to, tag, payload)
        st.send_s += time.perf_counter() - t0
        st.act_bytes_sent += len(payload)

    def _recv(self, frm: int, tag: str, st: _Step | None) -> torch.Tensor:
        t0 = time.perf_counter()
        data = self.comm.recv(frm, tag)
        if st is not None:
            st.recv_s += time.perf_counter() - t0
        try:
            x = unpack(data, MAX_ACTIVATION_BYTES, self.codec)
        except ValueError as e:
            raise LinkError(f"{tag} from rank {frm}: {e}") from None
        return x.to(self.stage.device)

    def _average_buffers(self, samples: int, is_first: bool) -> None:
        """The stage's buffers agree on its replicas (as base.average_buffers over the ring):
        floating ones weighted by the samples each served, counters from chain 0's holder."""
        replica = self.stage
        weight = samples / self.cfg.batch_size
        parts = [(b.detach().to("cpu", torch.float64) * (weight if b.is_floating_point() else float(is_first)))
                 .reshape(-1) for b in replica.buffers]
        summed = self.stage_comm.allreduce(torch.cat(parts).to(torch.float32))
        with torch.no_grad():
            at = 0
            for b in replica.buffers:
                b.copy_(summed[at:at + b.numel()].view(b.shape).to(b.dtype))
                at += b.numel()

    # ---- decision ------------------------------------------------------------------
    def commit(self) -> None:
        if self._pending is None:
            return
        t0 = time.perf_counter()
        p, self._pending = self._pending, None
        self.stage.clip_coef = p.clip_coef
        self.stage.apply(p.step, p.grads, skipped=p.skipped)
        self.commit_s += time.perf_counter() - t0

    def abort(self) -> int | None:
        if self._pending is None:
            return None
        p, self._pending = self._pending, None
        assert self.compressor is not None
        self.compressor.rollback(p.mark)
        self.stage.drop_grads()
        if p.saved_buffers is not None:
            self.stage.restore_buffers(p.saved_buffers)
        return p.step

    # ---- evaluation ----------------------------------------------------------------
    def evaluate(self, start: int, count: int, batch_size: int, order: dict):
        """The items [start, start + count) split among the order's chains (micro_sizes),
        each chain's in batches of batch_size through its stages; the last stages return
        the sums, the others (0, {}, {})."""
        replica, task = self.stage, self.stage.task
        s, first, last = replica.stage, replica.first, replica.last
        chains = self._chains(order, None)
        step = int(order.get("step") or 0)
        end = min(start + max(0, count), len(replica.val_ds))
        n = max(0, end - start)
        sizes = micro_sizes(n, len(chains))
        sizes += [0] * (len(chains) - len(sizes))
        batch_size = max(1, batch_size)
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        done = 0
        replica.model.eval()
        try:
            with torch.no_grad():
                for d, chain in enumerate(chains):
                    if chain[s] != replica.rank:
                        continue
                    lo = start + sum(sizes[:d])
                    hi = lo + sizes[d]
                    for k, b in enumerate(range(lo, hi, batch_size)):
                        idx = range(b, min(b + batch_size, hi))
                        tag = f"e:{step}:{d}:{k}"
                        act = None if first else self._recv(chain[s - 1], tag, None)
                        batch = None
                        if first or last:
                            seeds = [("item", self.cfg.seed, "val", i) for i in idx]
                            batch = to_device(task.load_batch("val", replica.val_ds, idx, seeds), replica.device)
                        if last:
                            model = replica.model if first else Tail(replica.model, act)
                            bs, bc = task.metric_sums(model, batch, len(idx))
                            for key, v in bs.items():
                                sums[key] = sums.get(key, 0.0) + v
                                counts[key] = counts.get(key, 0.0) + bc[key]
                            done += len(idx)
                            continue
                        if first:
                            out = head(task, lambda m: task.metric_sums(m, batch, len(idx)), replica.model,
                                       "evaluate" if task._eval is not None else "compute_loss").output
                        else:
                            out = replica.model(act)
                        self._check_activation(out)
                        self.comm.send(chain[s + 1], tag, pack(out, self.codec))
        finally:
            replica.model.train()
        return (done, sums, counts) if last else (0, {}, {})
