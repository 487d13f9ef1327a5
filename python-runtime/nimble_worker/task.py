"""Loads the researcher's task file and calls it defensively.

Contract: build_model(args) -> nn.Module, build_dataset(split, args) -> Dataset
(split "train" or "val"); optional compute_loss(model, batch) -> scalar Tensor (the batch's
mean loss) or a (loss_sum, count) pair (e.g. summed over tokens, and the token count: the
step's loss is then the sum over every worker's batches over the total count, exactly,
however the batch is split), evaluate(model, batch) -> dict[str, float] of batch means, or
a (sums, counts) pair of dicts (each metric is then its sums over its counts across the
whole evaluation: token-weighted perplexity, F1 from counts), collate(items) -> batch
(instead of torch's default_collate) and build_optimizer(model, args) -> torch optimizer
(its parameter groups are then the task's own). Every failure becomes a TaskError whose `where` names
the file and the function, e.g. "task.py: build_model".
"""

from __future__ import annotations

import importlib.util
import math
import os
import site
import sys
import traceback
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from .data import item_seed


# What the coordinator keeps of evaluate()'s metrics (src/protocol/messages.ts, metricsSchema).
MAX_METRIC_NAME = 128
MAX_METRICS = 256


class LossTerm(NamedTuple):
    """What compute_loss returned: a mean (`count` None) or a sum over `count` units."""
    value: torch.Tensor
    count: float | None


class TaskError(Exception):
    """An error in the researcher's code (or file), reported with `kind: task`."""

    def __init__(self, message: str, where: str):
        super().__init__(f"{where}: {message}")
        self.message = message
        self.where = where


def _tail(exc: BaseException, lines: int = 6) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(tb).rstrip().splitlines()
    return "\n".join(text[-lines:])


DEFAULT_LOSS_FORMS = ("a dict batch for model(**batch) whose output has .loss or ['loss'], "
                      "a model returning (logits, loss), or an (inputs, targets) batch for "
                      "cross-entropy")


def _loss_of(out: Any) -> torch.Tensor | None:
    """The loss in a model's output: `.loss`, `["loss"]`, or the scalar second of a pair."""
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], torch.Tensor) \
            and out[1].dim() == 0:
        return out[1]
    return None


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, dict):
        return f"a dict with keys {sorted(map(str, x))[:8]}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"a {type(x).__name__}"


def default_compute_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The loss when the task defines no compute_loss: see DEFAULT_LOSS_FORMS."""
    if isinstance(batch, dict):
        out = model(**batch)
        loss = _loss_of(out)
        if loss is None:
            raise ValueError(f"model(**batch) returned {_describe(out)} with no loss; expected "
                             f"{DEFAULT_LOSS_FORMS}, or define compute_loss(model, batch)")
        return loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        out = model(x)
        loss = _loss_of(out)
        if loss is not None:
            return loss
        if isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor):
            return F.cross_entropy(out, y)
        raise ValueError(f"model(inputs) returned {_describe(out)}; expected {DEFAULT_LOSS_FORMS}, "
                         "or define compute_loss(model, batch)")
    raise ValueError(f"the batch is {_describe(batch)}; expected {DEFAULT_LOSS_FORMS}, or define "
                     "compute_loss(model, batch)")


class Task:
    """The loaded task module plus checked wrappers around its functions."""

    def __init__(self, path: str, args: dict[str, Any], package_dir: str | None = None,
                 site_dirs: Sequence[str] = ()):
        self.path = os.path.abspath(path)
        self.file = os.path.basename(path)
        self.args = args
        if not os.path.isfile(self.path):
            raise TaskError(f"task file not found: {self.path}", f"{self.file}: load")
        name = f"nimble_task_{abs(hash(self.path))}"
        if package_dir:  # a task package: its sibling modules import
            sys.path.insert(0, os.path.abspath(package_dir))
        for d in site_dirs:  # the job's requirements: after the base environment, .pth files read
            site.addsitedir(os.path.abspath(d))
        try:
            spec = importlib.util.spec_from_file_location(name, self.path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {self.path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses/pickle need the module registered
            spec.loader.exec_module(module)
        except Exception as e:
            hint = ""
            if isinstance(e, ModuleNotFoundError) and e.name and "." not in e.name:
                hint = (f"\nIf {e.name} is a pip package, add it to `requirements:` in the config.")
                if not package_dir:
                    hint += (f"\nIf {e.name}.py (or a {e.name}/ package) lies beside the task file, name "
                             "the task's folder in the config's `task:` so that it ships with it.")
            raise TaskError(f"importing the task failed:\n{_tail(e)}{hint}", f"{self.file}: import") from e
        self.module = module
        for fn in ("build_model", "build_dataset"):
            if not callable(getattr(module, fn, None)):
                raise TaskError(f"the task file must define {fn}()", f"{self.file}: {fn}")
        self._loss = getattr(module, "compute_loss", None)
        self._eval = getattr(module, "evaluate", None)
        self._collate = getattr(module, "collate", None)
        self._optimizer = getattr(module, "build_optimizer", None)
        self.collate = (lambda items: self._call("collate", self._collate, items)) if callable(self._collate) else None
        """The task's collate(items) wrapped, or None for torch's default_collate."""

    def where(self, fn: str) -> str:
        return f"{self.file}: {fn}"

    def _call(self, fn: str, f: Callable, *a: Any) -> Any:
        try:
            return f(*a)
        except TaskError:
            raise
        except Exception as e:
            raise TaskError(f"{type(e).__name__}: {e}\n{_tail(e)}", self.where(fn)) from e

    def build_model(self) -> torch.nn.Module:
        m = self._call("build_model", self.module.build_model, self.args)
        if not isinstance(m, torch.nn.Module):
            raise TaskError(f"must return a torch.nn.Module, got {type(m).__name__}",
                            self.where("build_model"))
        return m

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer | None:
        """The task's own optimizer, or None to build the config's."""
        if not callable(self._optimizer):
            return None
        opt = self._call("build_optimizer", self._optimizer, model, self.args)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TaskError(f"must return a torch.optim.Optimizer, got {type(opt).__name__}",
                            self.where("build_optimizer"))
        return opt

    def build_dataset(self, split: str) -> Any:
        ds = self._call("build_dataset", self.module.build_dataset, split, self.args)
        if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
            raise TaskError(f"build_dataset({split!r}) must return a Dataset with __len__ and "
                            f"__getitem__, got {type(ds).__name__}", self.where("build_dataset"))
        return ds

    def loss(self, model: torch.nn.Module, batch: Any) -> LossTerm:
        """compute_loss's result checked: a scalar mean, or a (loss_sum, count) pair."""
        fn = "compute_loss" if self._loss else "compute_loss (Nimble's default: the task defines none)"
        out = self._call(fn, self._loss or default_compute_loss, model, batch)
        count = None
        if isinstance(out, tuple) and len(out) == 2 and self._loss is not None:
            out, count = out
            try:
                count = float(count.item() if isinstance(count, torch.Tensor) else count)
            except (TypeError, ValueError, RuntimeError):
                raise TaskError(f"returned a (loss_sum, count) pair whose count is not a number "
                                f"({type(count).__name__})", self.where(fn)) from None
            if not math.isfinite(count) or count < 0:
                raise TaskError(f"returned a (loss_sum, count) pair with count {count}; it must be "
                                "a finite number >= 0", self.where(fn))
        if not isinstance(out, torch.Tensor) or out.numel() != 1 or out.dim() > 1:
            got = f"tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) \
                else type(out).__name__
            raise TaskError(f"must return a scalar tensor or a (loss_sum, count) pair, got {got}",
                            self.where(fn))
        if not out.is_floating_point():
            raise TaskError(f"loss must be a floating-point tensor, got {out.dtype}", self.where(fn))
        return LossTerm(out.reshape(()), count)

    def compute_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The batch's mean loss, whichever form compute_loss returns."""
        term = self.loss(model, batch)
        return term.value if term.count is None else term.value / max(term.count, 1e-12)

    def metric_sums(self, model: torch.nn.Module, batch: Any, n: int) -> tuple[dict[str, float], dict[str, float]]:
        """evaluate's metrics over a batch of `n` items as (sums, counts): a mean per batch
        counts n times; a (sums, counts) pair is taken as it is."""
        if self._eval is None:
            term = self.loss(model, batch)
            value = float(term.value.detach())
            return ({"loss": value * n}, {"loss": float(n)}) if term.count is None \
                else ({"loss": value}, {"loss": term.count})
        out = self._call("evaluate", self._eval, model, batch)
        if isinstance(out, tuple) and len(out) == 2 and all(isinstance(d, dict) for d in out):
            sums, counts = self._metrics(out[0]), self._metrics(out[1])
            if set(sums) != set(counts):
                raise TaskError(f"returned (sums, counts) whose metrics differ: {sorted(set(sums) ^ set(counts))[:8]}",
                                self.where("evaluate"))
            bad = next((k for k, c in counts.items() if c < 0), None)
            if bad is not None:
                raise TaskError(f"count of metric {bad!r} is {counts[bad]}; counts must be >= 0",
                                self.where("evaluate"))
            return sums, counts
        means = self._metrics(out)
        return {k: v * n for k, v in means.items()}, {k: float(n) for k in means}

    def evaluate(self, model: torch.nn.Module, batch: Any) -> dict[str, float]:
        """The batch's metrics as means (a (sums, counts) pair divided out)."""
        sums, counts = self.metric_sums(model, batch, 1)
        return {k: v / counts[k] if counts[k] else 0.0 for k, v in sums.items()}

    def _metrics(self, out: Any) -> dict[str, float]:
        if not isinstance(out, dict):
            raise TaskError(f"must return a dict of metric -> float, or a (sums, counts) pair of "
                            f"them, got {type(out).__name__}", self.where("evaluate"))
        if len(out) > MAX_METRICS:
            raise TaskError(f"returned {len(out)} metrics; at most {MAX_METRICS} are kept",
                            self.where("evaluate"))
        res: dict[str, float] = {}
        for k, v in out.items():
            if len(str(k)) > MAX_METRIC_NAME:
                raise TaskError(f"metric name {str(k)[:40]!r}... is {len(str(k))} characters; "
                                f"at most {MAX_METRIC_NAME}", self.where("evaluate"))
            try:
                res[str(k)] = float(v.item() if isinstance(v, torch.Tensor) else v)
            except (TypeError, ValueError, RuntimeError):
                raise TaskError(f"metric {k!r} is not a number ({type(v).__name__})",
                                self.where("evaluate")) from None
            if not math.isfinite(res[str(k)]):
                raise TaskError(f"metric {k!r} is {res[str(k)]}", self.where("evaluate"))
        return res

    def load_batch(self, split: str, dataset: Any, indices: Sequence[int],
                   seeds: Sequence[tuple] | None = None) -> Any:
        """The items at `indices` as one batch: the task's collate(items), or torch's
        default. A failing item is named by its split and index; seeds[k] (derive_seed's
        parts) seeds the `data.item_generator()` of the k-th item."""
        items = []
        for k, i in enumerate(indices):
            with item_seed(*(() if seeds is None else seeds[k])):
                try:
                    items.append(dataset[i])
                except Exception as e:
                    raise TaskError(f"{type(e).__name__}: {e}\n{_tail(e)}",
                                    self.where(f"build_dataset({split!r})[{i}]")) from e
        if self.collate is not None:
            return self.collate(items)
        return self._call("collate (torch's default_collate: the task defines none)",
                          default_collate, items)
