"""Loads the researcher's task file and calls it defensively.

Contract: build_model(args) -> nn.Module, build_dataset(split, args) -> Dataset
(split "train" or "val"), optional compute_loss(model, batch) -> scalar Tensor,
optional evaluate(model, batch) -> dict[str, float]. Every failure becomes a
TaskError whose `where` names the file and the function, e.g. "task.py: build_model".
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import traceback
from typing import Any, Callable

import torch
import torch.nn.functional as F


# What the coordinator keeps of evaluate()'s metrics (src/protocol/messages.ts, metricsSchema).
MAX_METRIC_NAME = 128
MAX_METRICS = 256


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


def default_compute_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


class Task:
    """The loaded task module plus checked wrappers around its functions."""

    def __init__(self, path: str, args: dict[str, Any]):
        self.path = os.path.abspath(path)
        self.file = os.path.basename(path)
        self.args = args
        if not os.path.isfile(self.path):
            raise TaskError(f"task file not found: {self.path}", f"{self.file}: load")
        name = f"nimble_task_{abs(hash(self.path))}"
        try:
            spec = importlib.util.spec_from_file_location(name, self.path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {self.path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses/pickle need the module registered
            spec.loader.exec_module(module)
        except Exception as e:
            raise TaskError(f"importing the task failed:\n{_tail(e)}", f"{self.file}: import") from e
        self.module = module
        for fn in ("build_model", "build_dataset"):
            if not callable(getattr(module, fn, None)):
                raise TaskError(f"the task file must define {fn}()", f"{self.file}: {fn}")
        self._loss = getattr(module, "compute_loss", None)
        self._eval = getattr(module, "evaluate", None)

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

    def build_dataset(self, split: str) -> Any:
        ds = self._call("build_dataset", self.module.build_dataset, split, self.args)
        if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
            raise TaskError(f"build_dataset({split!r}) must return a Dataset with __len__ and "
                            f"__getitem__, got {type(ds).__name__}", self.where("build_dataset"))
        return ds

    def compute_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        fn = "compute_loss"
        loss = self._call(fn, self._loss or default_compute_loss, model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.dim() > 1:
            got = f"tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) \
                else type(loss).__name__
            raise TaskError(f"must return a scalar tensor, got {got}", self.where(fn))
        if not loss.is_floating_point():
            raise TaskError(f"loss must be a floating-point tensor, got {loss.dtype}", self.where(fn))
        return loss.reshape(())

    def evaluate(self, model: torch.nn.Module, batch: Any) -> dict[str, float]:
        if self._eval is None:
            return {"loss": float(self.compute_loss(model, batch).detach())}
        out = self._call("evaluate", self._eval, model, batch)
        if not isinstance(out, dict):
            raise TaskError(f"must return a dict of metric -> float, got {type(out).__name__}",
                            self.where("evaluate"))
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
