"""The Trainer: one data-parallel replica and its step loop.

The communication backend is a `compress.Comm` (allreduce with a wire codec, allgather)
or a plain callable `allreduce(buf) -> summed buf` (a flat float32 CPU tensor in, the
elementwise sum over all workers out), so the Trainer can be driven by the fd-3 link or
directly by tests. The step's gradients go through the configured compressor.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

import torch

from . import safetensors
from .compress import Comm, Reduced, as_comm, build_compressor
from .config import JobConfig
from .data import GlobalSampler, collate, derive_seed
from .task import Task

AllReduce = Callable[[torch.Tensor], torch.Tensor]
CHECKPOINT_FILES = ("model.pt", "optimizer.pt", "schedule.pt", "data.json", "rng.pt", "meta.json",
                    "compressor.pt")
OPTIONAL_FILES = ("compressor.pt",)  # older checkpoints lack it: fresh compressor state


def build_optimizer(cfg: JobConfig, params) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    if o.name in ("adam", "adamw"):
        kind = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return kind(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.name!r} (sgd, adam, adamw)")


def lr_factor(cfg: JobConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr at scheduler step s (s = the optimizer step about to run)."""
    s_cfg, peak, total = cfg.lr_schedule, cfg.optimizer.lr, cfg.steps
    if s_cfg.name == "constant":
        return lambda s: 1.0
    if s_cfg.name != "warmup_cosine":
        raise ValueError(f"unknown lr_schedule {s_cfg.name!r} (constant, warmup_cosine)")
    warm, floor = s_cfg.warmup_steps, (s_cfg.min_lr / peak if peak else 0.0)

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        progress = min(1.0, (s - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        items = [to_device(v, device) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])


def params_hash(params: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class StepAborted(Exception):
    """A collective of this step was abandoned: a ring member was lost. Raised by the
    worker's Comm; the step leaves no trace (see Trainer.prepare)."""


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; MPS and some allocators a RuntimeError."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    seen: BaseException | None = err
    while seen is not None:  # also when raised inside the task (wrapped in a TaskError)
        if isinstance(seen, oom) or (type(seen) is RuntimeError and "out of memory" in str(seen)):
            return True
        seen = seen.__cause__
    return False


def _save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class Trainer:
    def __init__(self, cfg: JobConfig, task: Task, rank: int, world_size: int,
                 device: str, comm: "Comm | AllReduce", max_micro_batch: int | None = None,
                 speed: float = 1.0):
        self.cfg, self.task, self.rank, self.world_size = cfg, task, rank, world_size
        if max_micro_batch is not None and (isinstance(max_micro_batch, bool)
                                            or not isinstance(max_micro_batch, int)
                                            or max_micro_batch < 1):
            raise ValueError(f"max_micro_batch must be a positive integer, got {max_micro_batch!r}")
        self.max_micro_batch = max_micro_batch
        self.speed = 1.0
        self.set_speed(speed)
        self.micro_batches = 0  # of the last grads() call
        # (step, new cap) each time running out of device memory lowered max_micro_batch
        self.memory_caps: list[tuple[int, int]] = []
        # A prepared step awaiting commit or abort: (step, its reduced gradient, the
        # compressor's mark from before it)
        self.pending: tuple[int, Reduced, Any] | None = None
        # Seconds the last commit took (reported with the next step's compute)
        self.commit_s = 0.0
        self.device = torch.device(device)
        self.comm = _TimedComm(as_comm(comm, world_size))
        self.train_ds = task.build_dataset("train")
        self.val_ds = task.build_dataset("val")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = task.build_model().to(self.device)
        self.model.train()
        self.params = list(self.model.parameters())
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in named]
        self.names = [n for n, _ in named]
        self.compressor = build_compressor(cfg.compression, self.comm,
                                           [(n, p.shape) for n, p in named])
        self.optimizer = build_optimizer(cfg, self.trainable)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg))
        self.sampler = GlobalSampler(len(self.train_ds), cfg.batch_size, cfg.seed)
        self.next_step = 0

    def set_speed(self, speed: float) -> None:
        """Simulated slowness: after each step's forward/backward the worker sleeps
        (1/speed - 1) x its compute time (CPU time on a CPU device) (a testing aid for
        heterogeneous clusters)."""
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) \
                or not (0.0 < float(speed) <= 1.0):
            raise ValueError(f"speed must be a number in (0, 1], got {speed!r}")
        self.speed = float(speed)

    # ---- description -------------------------------------------------------------
    def describe(self) -> dict:
        n = sum(p.numel() for p in self.params)
        return {
            "params": n,
            "param_bytes": sum(p.numel() * p.element_size() for p in self.params),
            "model": f"{type(self.model).__name__} ({n:,} parameters)",
            "train_size": len(self.train_ds),
            "val_size": len(self.val_ds),
        }

    def hash(self) -> str:
        return params_hash(self.params)

    # ---- collective helpers ------------------------------------------------------
    def _write_back(self, tensors: Sequence[torch.Tensor], summed: torch.Tensor, grad: bool):
        offset = 0
        for t in tensors:
            chunk = summed[offset:offset + t.numel()].view(t.shape).to(t.device, t.dtype)
            offset += t.numel()
            if grad:
                t.grad = chunk
            else:
                with torch.no_grad():
                    t.copy_(chunk)

    def sync(self, source: int = 0) -> str:
        """Everyone ends with rank `source`'s parameters (one all-reduce of source-or-zeros)."""
        buf = flat(self.params)
        if self.rank != source:
            buf.zero_()
        self._write_back(self.params, self.comm.allreduce(buf), grad=False)
        return self.hash()

    def state_blob(self) -> bytes:
        """Everything a replica joining mid-run needs to continue exactly like this one:
        model, optimizer, LR schedule, step, and the compressor's shared state (a joiner's
        error-feedback memory starts empty: it has not dropped anything yet)."""
        self.commit()
        return _save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                      "schedule": self.scheduler.state_dict(), "next_step": self.next_step,
                      "compressor": self.compressor.state_dict()})

    def load_blob(self, blob: bytes) -> None:
        state = torch.load(io.BytesIO(blob), map_location=self.device, weights_only=True)
        self.abort()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["schedule"])
        self.next_step = int(state["next_step"])
        self.compressor.load_state_dict(state["compressor"], same_worker=False)

    def sync_state(self, source: int) -> str:
        """Every ring member ends with rank `source`'s whole training state: it contributes
        its state blob to one all-gather, the others an empty one. Returns the hash."""
        mine = self.state_blob() if self.rank == source else b""
        blobs = [b for b in self.comm.allgather(mine) if len(b) > 0]
        if len(blobs) != 1:
            raise RuntimeError(f"sync_state: expected one state blob (from rank {source}), got {len(blobs)}")
        if self.rank != source:
            self.load_blob(bytes(blobs[0]))
        return self.hash()

    # ---- training step -----------------------------------------------------------
    def backward(self, t: int, shares: Sequence[int]) -> tuple[float, torch.Tensor]:
        """Forward/backward over this worker's slice of step t.

        Returns (unscaled mean loss, flat float32 gradient scaled by share / batch_size);
        a share of 0 gives a zero gradient. Summing the gradients of all workers gives
        the gradient of the mean loss over the whole global batch.
        """
        loss_value, grads = self.grads(t, shares)
        return loss_value, flat(grads)

    def grads(self, t: int, shares: Sequence[int]) -> tuple[float, list[torch.Tensor]]:
        """As `backward`, the gradients one tensor per trainable parameter (on device)."""
        # One share per rank the job has had (ranks that joined later included).
        if len(shares) <= self.rank:
            raise ValueError(f"got {len(shares)} shares, none for rank {self.rank}")
        indices = self.sampler.indices(t, shares, self.rank)  # also validates shares
        torch.manual_seed(derive_seed("step", self.cfg.seed, t, self.rank))
        self.model.train()
        size = len(indices)
        while True:
            micro = min(self.max_micro_batch or size, size) or 1
            try:
                loss_value = self._accumulate(indices, micro)
                break
            except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
                if not is_out_of_memory(err) or micro <= 1:
                    raise
            # Out of device memory: the share is redone in micro-batches half the size (the
            # accumulated gradient is the same) and the cap kept for the rest of the job.
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.max_micro_batch = micro // 2
            self.memory_caps.append((t, self.max_micro_batch))
            torch.manual_seed(derive_seed("step", self.cfg.seed, t, self.rank))
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach()
                 .to(torch.float32) for p in self.trainable]
        return loss_value, grads

    def _accumulate(self, indices: Sequence[int], micro: int) -> float:
        """Forward/backward over `indices` in micro-batches of at most `micro`: each loss
        scaled by its size / batch_size, gradients accumulating. Returns the mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        self.micro_batches = 0
        for start in range(0, len(indices), micro):
            chunk = indices[start:start + micro]
            batch = to_device(collate(self.train_ds, chunk), self.device)
            loss = self.task.compute_loss(self.model, batch)
            (loss * (len(chunk) / self.cfg.batch_size)).backward()
            loss_value += float(loss.detach()) * len(chunk)
            self.micro_batches += 1
        return loss_value / len(indices) if len(indices) else 0.0

    def step(self, t: int, shares: Sequence[int], want_hash: bool = False) -> dict:
        """One step, applied at once (`prepare` then `commit`); `hash` is taken after it."""
        out = self.prepare(t, shares)
        self.commit()
        if want_hash:
            out["hash"] = self.hash()
        return out

    def prepare(self, t: int, shares: Sequence[int], want_hash: bool = False) -> dict:
        """Step t up to its reduced gradient, which waits for `commit` (apply it) or `abort`
        (drop it, and undo the compressor's changes): so that, when a ring member is lost
        mid-step, an update lands on every replica or on none. Every worker joins the same
        collectives, even with share 0 or a bad loss. A non-finite gradient (or loss)
        anywhere skips the update on every worker: no optimizer step and no compressor state
        change, but the schedule and the step counter advance, and the report says
        `skipped`. With `want_hash`, `hash` is of the parameters before this step's update.
        A collective that raises StepAborted abandons the step (nothing changes)."""
        if self.pending is not None:
            raise RuntimeError(f"step {self.pending[0]} is neither committed nor aborted")
        hash_before = self.hash() if want_hash else None
        lr = self.optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        loss_value, grads = self.grads(t, shares)
        if self.speed < 1.0:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                work = time.perf_counter() - t0
            else:
                # CPU seconds, not wall: on a host shared with other workers, contention must
                # not be multiplied into the simulated slowness.
                work = time.process_time() - cpu0
            time.sleep((1.0 / self.speed - 1.0) * work)
        # Forward/backward alone (what a share costs): the rest of compute_s (compression,
        # the optimizer) is about the same whatever the share, so it does not guide shares.
        t1 = time.perf_counter()
        self.comm.seconds = 0.0
        bad_loss = not math.isfinite(loss_value)
        mark = self.compressor.mark()
        try:
            res = self.compressor.reduce(t, self.names, grads,
                                         shares[self.rank] / self.cfg.batch_size, poison=bad_loss)
        except StepAborted:
            self.compressor.rollback(mark)
            self.optimizer.zero_grad(set_to_none=True)
            raise
        self.pending = (t, res, mark)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t3 = time.perf_counter()
        comm_s = self.comm.seconds
        # The previous step's commit ran just before this one: its optimizer work counts here.
        commit_s, self.commit_s = self.commit_s, 0.0
        out = {"step": t, "loss": 0.0 if bad_loss else loss_value,
               "samples": int(shares[self.rank]), "micro_batches": self.micro_batches,
               "max_micro_batch": self.max_micro_batch,
               "lr": lr,
               "compute_s": max(0.0, (t3 - t0) - comm_s) + commit_s, "comm_s": comm_s,
               "forward_backward_s": t1 - t0,
               "dense_count": sum(p.numel() for p in self.trainable),
               "skipped": res.skipped}
        if res.skipped:
            out["nonfinite"] = (["loss"] if bad_loss else []) + res.nonfinite
        if hash_before is not None:
            out["hash"] = hash_before
        return out

    def commit(self) -> None:
        """Apply the prepared step's update (nothing when none is pending)."""
        if self.pending is None:
            return
        t0 = time.perf_counter()
        t, res, _ = self.pending
        self.pending = None
        if not res.skipped:
            assert res.grads is not None
            for p, g in zip(self.trainable, res.grads):
                p.grad = g.to(p.device, p.dtype).view(p.shape)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.next_step = t + 1
        self.commit_s += time.perf_counter() - t0

    def abort(self) -> int | None:
        """Drop the prepared step's update (the coordinator found a member lost before every
        member had reduced it); returns that step, or None when none was pending."""
        if self.pending is None:
            return None
        t, _, mark = self.pending
        self.pending = None
        self.compressor.rollback(mark)  # its memories and Q's moved on during the reduce
        self.optimizer.zero_grad(set_to_none=True)
        return t

    # ---- evaluation --------------------------------------------------------------
    def eval(self, start: int, count: int, batch_size: int) -> tuple[int, dict[str, float]]:
        end = min(start + max(0, count), len(self.val_ds))
        batch_size = max(1, batch_size)
        sums: dict[str, float] = {}
        self.model.eval()
        try:
            with torch.no_grad():
                for b in range(start, end, batch_size):
                    idx = range(b, min(b + batch_size, end))
                    batch = to_device(collate(self.val_ds, idx), self.device)
                    for k, v in self.task.evaluate(self.model, batch).items():
                        sums[k] = sums.get(k, 0.0) + v * len(idx)
        finally:
            self.model.train()
        return max(0, end - start), sums

    # ---- state -------------------------------------------------------------------
    def state(self, kind: str) -> list[tuple[str, bytes]]:
        if kind == "final":
            tensors = {k: v for k, v in self.model.state_dict().items()
                       if v.dtype in safetensors.DTYPES}
            meta = {"step": str(self.next_step), "name": self.cfg.name,
                    "model": self.describe()["model"]}
            return [("model.safetensors", safetensors.dumps(tensors, meta))]
        compressor = ("compressor.pt", _save({"rank": self.rank, "world_size": self.world_size,
                                              "method": self.cfg.compression.method,
                                              "state": self.compressor.state_dict()}))
        if kind == "compressor":  # per worker: the rest of a checkpoint is the same everywhere
            return [compressor]
        if kind != "checkpoint":
            raise ValueError(f"unknown state kind {kind!r}")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"step": self.next_step, "world_size": self.world_size, "config": self.cfg_dict()}
        return [
            ("model.pt", _save(self.model.state_dict())),
            ("optimizer.pt", _save(self.optimizer.state_dict())),
            ("schedule.pt", _save(self.scheduler.state_dict())),
            ("data.json", json.dumps({"step": self.next_step}).encode()),
            ("rng.pt", _save(rng)),
            ("meta.json", json.dumps(meta).encode()),
            compressor,
        ]

    def load_state(self, files: dict[str, bytes]) -> int:
        missing = [f for f in CHECKPOINT_FILES if f not in files and f not in OPTIONAL_FILES]
        if missing:
            raise ValueError(f"checkpoint is missing {', '.join(missing)}")

        def load(name: str) -> Any:
            return torch.load(io.BytesIO(files[name]), map_location=self.device, weights_only=True)

        self.model.load_state_dict(load("model.pt"))
        self.optimizer.load_state_dict(load("optimizer.pt"))
        self.scheduler.load_state_dict(load("schedule.pt"))
        self.next_step = int(json.loads(files["data.json"])["step"])
        if "compressor.pt" in files:
            # Error-feedback memories are per worker; the coordinator checkpoints one
            # rank, so only that rank (in a run of the same size) gets its memories back.
            c = torch.load(io.BytesIO(files["compressor.pt"]), map_location="cpu",
                           weights_only=True)
            if c.get("method") == self.cfg.compression.method:
                same = c.get("rank") == self.rank and c.get("world_size") == self.world_size
                self.compressor.load_state_dict(c["state"], same)
        rng = torch.load(io.BytesIO(files["rng.pt"]), map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch"].cpu())
        random.setstate(_to_tuple(rng["python"]))
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
        return self.next_step

    def cfg_dict(self) -> dict:
        return asdict(self.cfg)


class _TimedComm:
    """Counts the seconds spent inside collectives (`comm_s`)."""

    def __init__(self, inner: Comm):
        self.inner, self.seconds = inner, 0.0

    @property
    def world_size(self) -> int:
        """Members of the ring now: fewer than the job's ranks once some have left."""
        return self.inner.world_size

    def allreduce(self, buf: torch.Tensor, codec: str = "f32") -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.inner.allreduce(buf, codec)
        finally:
            self.seconds += time.perf_counter() - t0

    def allgather(self, blob: bytes) -> list[bytes]:
        t0 = time.perf_counter()
        try:
            return self.inner.allgather(blob)
        finally:
            self.seconds += time.perf_counter() - t0


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
