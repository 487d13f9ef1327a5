"""The Replica: one copy of the model being trained, and what every strategy does with it.

It holds the model, the optimizer and its schedule, and the task's data in the global
sample order (`data.GlobalSampler`: a step's samples depend only on seed, step and batch
size). It computes the gradient of a share of a step (in micro-batches, halving them
when the device runs out of memory), applies an update, evaluates and hashes. It never
talks to other workers: strategies (`strategies/`) decide what crosses the network.
"""

from __future__ import annotations

import random
import sys
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import torch

from .aids import SpeedAid
from .config import JobConfig
from .data import GlobalSampler, derive_seed
from .optim import build_optimizer, build_scheduler
from .precision import LossScale, autocast
from .prefetch import Prefetcher, global_rng_states
from .task import LossTerm, Task, TaskError
from .tensors import params_hash, to_device, unflat


LossTotals = Callable[[float, float], tuple[float, float]]
"""(loss_sum, count) of this worker -> their sums over every worker."""


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; MPS and some allocators a RuntimeError."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    seen: BaseException | None = err
    while seen is not None:  # also when raised inside the task (wrapped in a TaskError)
        if isinstance(seen, oom) or (type(seen) is RuntimeError and "out of memory" in str(seen)):
            return True
        seen = seen.__cause__
    return False


def check_max_micro_batch(value) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_micro_batch must be a positive integer, got {value!r}")
    return value


class Replica:
    def __init__(self, cfg: JobConfig, task: Task, rank: int, world_size: int, device: str,
                 max_micro_batch: int | None = None, speed: float = 1.0):
        self.cfg, self.task, self.rank, self.world_size = cfg, task, rank, world_size
        self.device = torch.device(device)
        self.max_micro_batch = check_max_micro_batch(max_micro_batch)
        """Largest micro-batch run at once (None: the whole share); lowered on out-of-memory."""
        self.memory_caps: list[tuple[int, int]] = []
        """(step, new cap) each time running out of device memory lowered max_micro_batch."""
        self.micro_batches = 0
        """Forward/backward passes of the last `grads` call."""
        self.speed = SpeedAid(speed, self.device, lambda: self.prefetch.cpu_s if self.prefetch else 0.0)
        self.train_ds = task.build_dataset("train")
        self.val_ds = task.build_dataset("val")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = self._build_model()
        self.model.train()
        self.params = list(self.model.parameters())
        named = [(n, p) for n, p in self._named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in named]
        self.names = [n for n, _ in named]
        self.buffers = [b for b in self.model.buffers()]
        """Running statistics and the like: kept the same on every replica (strategies)."""
        self.optimizer = task.build_optimizer(self.model) or build_optimizer(cfg, named)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.loss_scale = LossScale(cfg.precision)
        self.sampler = GlobalSampler(len(self.train_ds), cfg.batch_size, cfg.seed)
        self.next_step = 0
        """The next step to run (steps applied so far): also the data position."""
        self.loss_form: str | None = None
        """"mean" or "sum": which form the task's compute_loss returns (known after its first call)."""
        self.prefetch = Prefetcher(self._load) if cfg.prefetch > 0 else None
        """Loads the next steps' batches in the background; None when prefetch is off."""

    def _build_model(self) -> torch.nn.Module:
        """The model this replica trains, on its device (a pipeline stage builds only its own
        layers: pipeline/stage_replica.py)."""
        return self.task.build_model().to(self.device)

    def _named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of every parameter, model.parameters() order; the names are
        those of the whole model (what gradients and final weights are named by)."""
        return list(self.model.named_parameters())

    def weights_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state under the whole model's names (model.safetensors)."""
        return self.model.state_dict(keep_vars=False)

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
        """Of the parameters and the buffers: replicas whose running statistics drifted apart differ."""
        return params_hash(self.params + self.buffers)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def dense_count(self) -> int:
        """float32 elements of one uncompressed all-reduce of the whole gradient."""
        return sum(p.numel() for p in self.trainable)

    def named_shapes(self) -> list[tuple[str, torch.Size]]:
        return [(n, p.shape) for n, p in zip(self.names, self.trainable)]

    # ---- gradients ---------------------------------------------------------------
    def grads(self, t: int, shares: Sequence[int],
              totals: LossTotals | None = None) -> tuple[float, list[torch.Tensor]]:
        """Forward/backward over this worker's share of step t (one share per rank the job
        has had, ranks that joined later included). Returns the unscaled mean loss and one
        float32 gradient per trainable parameter, scaled so that summed over workers they
        are the gradient of the mean loss over the global batch: by share / batch_size for
        a compute_loss that returns a mean, by 1 / (every worker's count) for one that
        returns (loss_sum, count), whose `totals` (a collective every worker joins, since
        every worker knows the form: `loss_form`) sums (loss_sum, count) over the workers;
        the loss is then the global one. A share of 0 gives zero gradients. The speed
        aid's sleep is part of it."""
        self.speed.start()
        if len(shares) <= self.rank:
            raise ValueError(f"got {len(shares)} shares, none for rank {self.rank}")
        self.sampler.start(t, shares, self.rank)  # validates shares
        size = shares[self.rank]
        torch.manual_seed(derive_seed("step", self.cfg.seed, t, self.rank))
        self.model.train()
        while True:
            micro = min(self.max_micro_batch or size, size) or 1
            parts = self._parts(t, shares, micro)
            ahead = self.prefetch.take((t, tuple(shares), micro)) if self.prefetch else None
            if ahead is not None:
                self._load_ahead(t, shares, micro)  # while this step computes
            try:
                loss_sum, count = self._accumulate(parts, ahead)
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
        self._load_ahead(t, shares, micro)  # while the gradient travels (no-op if done above)
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach()
                 .to(torch.float32) for p in self.trainable]
        if self.loss_form is None:  # share 0 at the first step: no loss seen yet
            self._probe_loss_form()
        if self.loss_form == "sum":
            loss_sum, count = totals(loss_sum, count) if totals is not None else (loss_sum, count)
            for g in grads:
                g.mul_(1.0 / count if count > 0 else 0.0)
            loss_value = loss_sum / count if count > 0 else float("nan")
        else:
            loss_value = loss_sum / count if count else 0.0
        self.speed.stretch()
        return loss_value, grads

    def _accumulate(self, parts: Sequence[tuple[list[int], list[tuple]]],
                    ahead: Sequence[Future] | None) -> tuple[float, float]:
        """Forward/backward over the micro-batches `parts` (loaded ahead, or loaded here),
        gradients accumulating: a mean loss scaled by its size / batch_size, a loss sum as
        it is. Returns (loss sum, count): samples for a mean, the task's counts for a sum."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, count = 0.0, 0.0
        self.micro_batches = 0
        scale = self.loss_scale.value
        for k, part in enumerate(parts):
            batch = ahead[k].result() if ahead is not None else self._load_here(part)
            batch = to_device(batch, self.device)
            with autocast(self.cfg.precision, self.device):
                term = self.task.loss(self.model, batch)
            self._note_loss_form(term)
            n = len(part[0])
            weight = scale * n / self.cfg.batch_size if term.count is None else scale
            (term.value.float() * weight).backward()
            loss_sum += float(term.value.detach()) * (n if term.count is None else 1)
            count += n if term.count is None else term.count
            self.micro_batches += 1
        return loss_sum, count

    def _note_loss_form(self, term: LossTerm) -> None:
        form = "mean" if term.count is None else "sum"
        if self.loss_form is None:
            self.loss_form = form
        elif form != self.loss_form:
            def said(f: str) -> str:
                return "a scalar mean" if f == "mean" else "a (loss_sum, count) pair"
            raise TaskError(f"returned {said(form)} after {said(self.loss_form)}; it must "
                            "return the same form every time (every worker relies on it)",
                            self.task.where("compute_loss"))

    def _probe_loss_form(self) -> None:
        """The loss form, for a worker whose first share is 0: from one training item, in
        eval mode without gradients, random state and buffers left as they were."""
        saved = self.buffers_snapshot()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            self.model.eval()
            try:
                batch = to_device(self.task.load_batch("train", self.train_ds, [0], [("probe",)]), self.device)
                self._note_loss_form(self.task.loss(self.model, batch))
            finally:
                self.model.train()
                self.restore_buffers(saved)

    # ---- data --------------------------------------------------------------------
    # Prefetch: after step t's batches are taken (or loaded), a thread loads those of steps
    # t+1 .. t+prefetch, guessing they keep t's shares and micro-batch size; a step whose
    # guess was wrong drops them and loads its own here. The batches are the same either
    # way: the same indices in the same order and the same collate, each item's
    # data.item_generator() seeded from its stream position. A dataset that draws from a
    # global generator instead (shared with the training thread, whose per-step seed
    # dropout uses) would change results on another thread: a load here that moves one
    # turns prefetch off for the job.
    def _parts(self, t: int, shares: Sequence[int], micro: int) -> list[tuple[list[int], list[tuple]]]:
        """Step t's micro-batches of at most `micro` samples: (indices, item seeds) each."""
        indices = self.sampler.indices(t, shares, self.rank)
        start = self.sampler.start(t, shares, self.rank)
        seeds = [("item", self.cfg.seed, start + k) for k in range(len(indices))]
        return [(indices[at:at + micro], seeds[at:at + micro]) for at in range(0, len(indices), micro)]

    def _load(self, part: tuple[list[int], list[tuple]]) -> Any:
        return self.task.load_batch("train", self.train_ds, *part)

    def _load_here(self, part: tuple[list[int], list[tuple]]) -> Any:
        """A batch loaded on the training thread, checking that loading leaves the global
        generators alone while prefetch is on."""
        if self.prefetch is None:
            return self._load(part)
        before = global_rng_states()
        batch = self._load(part)
        if global_rng_states() != before:
            self.prefetch = None
            print("nimble_worker: prefetch is off: the task's dataset or collate draws from a "
                  "global random generator (torch's, random's or numpy's), which a background "
                  "thread would share with training; draw augmentations from "
                  "nimble_worker.data.item_generator() instead", file=sys.stderr, flush=True)
        return batch

    def _load_ahead(self, t: int, shares: Sequence[int], micro: int) -> None:
        """Schedule steps t+1 .. t+prefetch (within the job) with these shares and micro size."""
        for s in range(t + 1, min(t + 1 + self.cfg.prefetch, self.cfg.steps)):
            key = (s, tuple(shares), micro)
            if self.prefetch is None:
                return
            if not self.prefetch.scheduled(key) and not self.prefetch.schedule(key, self._parts(s, shares, micro)):
                self.prefetch = None  # no thread to be had: load as without prefetch

    # ---- updates -----------------------------------------------------------------
    def apply(self, step: int, grads: Sequence[torch.Tensor] | None) -> None:
        """Finish step `step`: an optimizer step with `grads` (None: a skipped step, no
        update), then the schedule's step; `next_step` becomes step + 1."""
        if grads is not None:
            unscale = 1.0 / self.loss_scale.value
            for p, g in zip(self.trainable, grads):
                p.grad = (g * unscale if unscale != 1.0 else g).to(p.device, p.dtype).view(p.shape)
            if self.cfg.grad_clip > 0:
                # The reduced gradient is the same on every replica, so is the clipped one.
                torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
            self.optimizer.step()
        self.loss_scale.update(skipped=grads is None)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.next_step = step + 1

    def drop_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def load_params(self, summed: torch.Tensor) -> None:
        """Overwrite every parameter from one flat float32 buffer (model.parameters() order)."""
        with torch.no_grad():
            for p, chunk in zip(self.params, unflat(summed, self.params)):
                p.copy_(chunk)

    # ---- evaluation --------------------------------------------------------------
    def eval(self, start: int, count: int, batch_size: int) -> tuple[int, dict[str, float], dict[str, float]]:
        """The task's metrics over validation items start .. start+count-1 (clipped to the
        split) as sums and counts (batch means count their items; a (sums, counts) pair
        from evaluate counts as it says); returns (items evaluated, sums, counts)."""
        end = min(start + max(0, count), len(self.val_ds))
        batch_size = max(1, batch_size)
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        if self.prefetch is not None:
            self.prefetch.settle()  # the task's data code runs on one thread at a time
        self.model.eval()
        try:
            with torch.no_grad():
                for b in range(start, end, batch_size):
                    idx = range(b, min(b + batch_size, end))
                    seeds = [("item", self.cfg.seed, "val", i) for i in idx]
                    batch = to_device(self.task.load_batch("val", self.val_ds, idx, seeds), self.device)
                    batch_sums, batch_counts = self.task.metric_sums(self.model, batch, len(idx))
                    for k, v in batch_sums.items():
                        sums[k] = sums.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0.0) + batch_counts[k]
        finally:
            self.model.train()
        return max(0, end - start), sums, counts

    # ---- state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What makes another replica continue exactly like this one."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.scheduler.state_dict(), "next_step": self.next_step,
                "loss_scale": self.loss_scale.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["schedule"])
        self.next_step = int(state["next_step"])
        self.loss_scale.load_state_dict(state.get("loss_scale"))

    # ---- buffers -----------------------------------------------------------------
    def buffers_snapshot(self) -> list[torch.Tensor]:
        return [b.detach().clone() for b in self.buffers]

    def restore_buffers(self, saved: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for b, s in zip(self.buffers, saved):
                b.copy_(s)
