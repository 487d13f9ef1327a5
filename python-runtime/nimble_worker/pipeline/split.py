"""A pipeline stage's layers, built without materialising the whole model; and the
layers' costs, measured one layer at a time (`profile_layers`).

An nn.Sequential model (what build_model returns) is built on the meta device; stage s
takes its top-level children bounds[s] .. bounds[s+1]-1 into an nn.Sequential that keeps
their names (so its state_dict keys are the whole model's: `3.weight`). Only those are
materialised, and each top-level child i is initialised from the seed
derive_seed("layer", seed, i) by calling reset_parameters() on every module of it that has
one (children before their parent, as construction runs them; reset_running_stats()
where a module has only that). So every layout, one worker holding the whole model
included, starts from the same weights.

A task whose model is not an nn.Sequential defines build_stages(args, n_stages) -> a list
of n_stages modules (stage s runs on stage s-1's output); their parameters, in order,
must be build_model()'s, which gives them their names. Each stage's child i is then
initialised from derive_seed("stage", seed, s, i).

A parameter (or floating buffer) that no reset method sets is an error: it would hold
whatever the memory held.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..config import JobConfig
from ..data import GlobalSampler, derive_seed
from ..precision import autocast
from ..task import Task, TaskError
from ..tensors import to_device
from .capture import SavedBytes, Tail, head, nbytes


@dataclass
class StageModel:
    module: nn.Module
    """The stage's layers, materialised on the device."""
    names: list[str]
    """The whole model's names of module.parameters(), in order."""
    stage: int
    stages: int
    layers: list[int]
    """Global indices of the layers it holds: top-level children, or [stage] (build_stages)."""
    sequential: bool
    """True: a slice of an nn.Sequential; False: the task's build_stages."""
    state_names: dict[str, str] = field(default_factory=dict)
    """module.state_dict() key -> the whole model's (identity for a Sequential slice)."""

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1


def meta_model(task: Task) -> nn.Module:
    """build_model() on the meta device: shapes without memory."""
    with torch.device("meta"):
        return task.build_model()


def _check_sequential(task: Task, model: nn.Sequential) -> list[tuple[str, nn.Module]]:
    where = task.where("build_model")
    if type(model).forward is not nn.Sequential.forward:
        raise TaskError(f"{type(model).__name__} overrides nn.Sequential.forward; a pipeline runs "
                        "the top-level children one after another, so the model must be exactly "
                        "that (or define build_stages(args, n_stages))", where)
    own = [n for n, _ in model.named_parameters(recurse=False)] + \
        [n for n, _ in model.named_buffers(recurse=False)]
    if own:
        raise TaskError(f"{type(model).__name__} holds {', '.join(own[:4])} itself, outside its "
                        "children; a pipeline splits the children, so move them into one", where)
    return list(model.named_children())


class UnsplittableModel(TaskError):
    """The model cannot be split into the configured stages: a config error for the
    coordinator (parallel.pipeline_stages), though found in the task."""


def _not_sequential(task: Task, model: nn.Module) -> TaskError:
    return UnsplittableModel(f"build_model returned {type(model).__name__}, not an nn.Sequential; define "
                     "build_stages(args, n_stages) or return an nn.Sequential", task.where("build_model"))


def check_bounds(bounds: Sequence[int], stages: int, n: int) -> list[int]:
    b = list(bounds)
    if len(b) != stages + 1 or b[0] != 0 or b[-1] != n or \
            any(not isinstance(x, int) or isinstance(x, bool) for x in b) or \
            any(b[k] >= b[k + 1] for k in range(stages)):
        raise ValueError(f"pipeline bounds {b} must be {stages + 1} increasing integers from 0 to "
                         f"{n} (the model's top-level layers)")
    return b


def default_bounds(children: Sequence[nn.Module], stages: int) -> list[int]:
    """Stages of about equal parameter counts (when the coordinator sent no bounds)."""
    from ..strategies.fragments import balanced_split
    sizes = [max(1, sum(p.numel() for p in c.parameters())) for c in children]
    return balanced_split(sizes, stages) + [len(children)]


def _too_many(task: Task, stages: int, n: int) -> TaskError:
    return UnsplittableModel(f"{stages} pipeline stages but the model has only {n} top-level layers; "
                     f"use at most {n} stages (parallel.pipeline_stages)", task.where("build_model"))


def build_stage(task: Task, cfg: JobConfig, stage: int, stages: int,
                bounds: Sequence[int] | None, device: torch.device | str) -> StageModel:
    """Stage `stage` of `stages`, materialised on `device` from the seeded init."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is not one of 0 .. {stages - 1}")
    model = meta_model(task)
    if isinstance(model, nn.Sequential):
        children = _check_sequential(task, model)
        if stages > len(children):
            raise _too_many(task, stages, len(children))
        b = check_bounds(bounds, stages, len(children)) if bounds is not None \
            else default_bounds([c for _, c in children], stages)
        lo, hi = b[stage], b[stage + 1]
        module = nn.Sequential(OrderedDict(children[lo:hi]))
        module.to_empty(device="cpu")
        for i, (name, child) in zip(range(lo, hi), children[lo:hi]):
            init_unit(task, child, derive_seed("layer", cfg.seed, i), name)
        module.to(device)
        names = [n for n, _ in module.named_parameters()]
        keys = list(module.state_dict().keys())
        return StageModel(module, names, stage, stages, list(range(lo, hi)), True, dict(zip(keys, keys)))
    stage_modules = meta_stages(task, model, stages)
    names, buffer_names = stage_names(task, model, stage_modules)
    module = stage_modules[stage]
    module.to_empty(device="cpu")
    for i, (label, unit) in enumerate(units(module, f"stage {stage}")):
        init_unit(task, unit, derive_seed("stage", cfg.seed, stage, i), label)
    module.to(device)
    by_id = {id(p): n for p, n in zip(module.parameters(), names[stage])}
    by_id.update({id(b): n for (_, b), n in zip(module.named_buffers(), buffer_names[stage])})
    state_names, used = {}, set()
    for key, value in module.state_dict(keep_vars=True).items():
        name = by_id.get(id(value))
        if name is None or name in used:
            name = f"stage{stage}.{key}"
        used.add(name)
        state_names[key] = name
    return StageModel(module, names[stage], stage, stages, [stage], False, state_names)


def meta_stages(task: Task, model: nn.Module, stages: int) -> list[nn.Module]:
    """The task's build_stages(args, stages), on the meta device, checked."""
    fn = getattr(task.module, "build_stages", None)
    if not callable(fn):
        raise _not_sequential(task, model)
    where = task.where("build_stages")
    with torch.device("meta"):
        out = task._call("build_stages", fn, task.args, stages)
    if not isinstance(out, (list, tuple)) or not all(isinstance(m, nn.Module) for m in out):
        raise TaskError(f"must return a list of {stages} torch.nn.Module, got {type(out).__name__}", where)
    if len(out) != stages:
        raise TaskError(f"returned {len(out)} modules for {stages} stages; it must return exactly "
                        f"n_stages ({stages})", where)
    return list(out)


def stage_names(task: Task, model: nn.Module, stage_modules: Sequence[nn.Module]):
    """Per stage, the whole model's names of its parameters (and buffers), positionally:
    build_model()'s parameters in order must be the stages' in order, shape by shape.
    Buffers are named the same way when they match too, else `stage<s>.<name>`."""
    where = task.where("build_stages")
    whole = list(model.named_parameters())
    parts = [list(m.parameters()) for m in stage_modules]
    flat = [p for part in parts for p in part]
    if len(flat) != len(whole):
        raise TaskError(f"the stages hold {len(flat)} parameters, build_model()'s model "
                        f"{len(whole)}; build_stages must split the same parameters, in order", where)
    for k, ((name, w), p) in enumerate(zip(whole, flat)):
        if tuple(w.shape) != tuple(p.shape):
            raise TaskError(f"parameter {k} of the stages has shape {tuple(p.shape)}, but build_model()'s "
                            f"parameter {k} ({name}) has shape {tuple(w.shape)}; build_stages must "
                            "split the same parameters, in order", where)
    names, at = [], 0
    for part in parts:
        names.append([n for n, _ in whole[at:at + len(part)]])
        at += len(part)
    whole_b = list(model.named_buffers())
    parts_b = [list(m.named_buffers()) for m in stage_modules]
    flat_b = [b for part in parts_b for _, b in part]
    match = len(flat_b) == len(whole_b) and all(
        tuple(a.shape) == tuple(b.shape) for (_, a), b in zip(whole_b, flat_b))
    buffer_names, at = [], 0
    for s, part in enumerate(parts_b):
        buffer_names.append([n for n, _ in whole_b[at:at + len(part)]] if match
                            else [f"stage{s}.{n}" for n, _ in part])
        at += len(part)
    return names, buffer_names


def units(module: nn.Module, label: str) -> list[tuple[str, nn.Module]]:
    """What a build_stages stage is initialised in: its children, each from its own seed;
    or the whole module when it has none, or holds parameters or a reset of its own."""
    children = list(module.named_children())
    own = any(True for _ in module.parameters(recurse=False)) or \
        any(True for _ in module.buffers(recurse=False)) or callable(getattr(module, "reset_parameters", None))
    if not children or own:
        return [(label, module)]
    return [(f"{label}.{n}", c) for n, c in children]


RESETS = ("reset_parameters", "_reset_parameters", "reset_running_stats")
"""What initialises a module, the first it has: its public reset, torch's private one
(nn.MultiheadAttention, nn.Transformer), or only its running statistics."""


def reset_order(unit: nn.Module) -> list[nn.Module]:
    """The unit's modules, each once, children before their parent (as construction runs
    their resets): a parent's reset that re-initialises its children's weights (scaled
    projections, nn.Transformer's xavier init) has the last word, as in eager construction."""
    out: list[nn.Module] = []
    seen: set[int] = set()

    def visit(m: nn.Module) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        for child in m.children():
            visit(child)
        out.append(m)
    visit(unit)
    return out


def init_unit(task: Task, unit: nn.Module, seed: int, label: str) -> None:
    """Initialise a materialised (to_empty) unit from `seed`: the reset (RESETS) of every
    module that has one, in `reset_order`. Parameters and floating buffers start as NaN,
    integer ones as 0, so one that no reset sets is found."""
    with torch.no_grad():
        for t in list(unit.parameters()) + list(unit.buffers()):
            t.fill_(math.nan) if t.is_floating_point() else t.zero_()
        torch.manual_seed(seed)
        for m in reset_order(unit):
            fn = next((f for f in (getattr(m, name, None) for name in RESETS) if callable(f)), None)
            if fn is not None:
                task._call("build_model", fn)
    for mname, m in unit.named_modules():
        for kind, items in (("parameter", m.named_parameters(recurse=False)),
                            ("buffer", m.named_buffers(recurse=False))):
            for n, t in items:
                if t.is_floating_point() and t.numel() and bool(torch.isnan(t).any()):
                    path = ".".join(x for x in (label, mname, n) if x)
                    raise TaskError(
                        f"{kind} {path} of {type(m).__name__} is not set by any reset_parameters(): "
                        "a pipeline builds the model on the meta device and initialises each layer "
                        f"from its seed by calling reset_parameters() on its modules; give "
                        f"{type(m).__name__} a reset_parameters() that sets it, or define "
                        "build_stages(args, n_stages)", task.where("build_model"))


# ---- profiling -------------------------------------------------------------------
def profile_units(task: Task, cfg: JobConfig) -> tuple[nn.Module, bool, list[tuple[str, nn.Module, int]]]:
    """(the meta model, whether it is a Sequential, [(name, unit, seed)]): what a pipeline
    splits, each unit with the seed a stage initialises it from."""
    model = meta_model(task)
    if isinstance(model, nn.Sequential):
        children = _check_sequential(task, model)
        return model, True, [(n, c, derive_seed("layer", cfg.seed, i)) for i, (n, c) in enumerate(children)]
    stages = cfg.parallel.pipeline_stages if cfg.parallel is not None else 1
    mods = meta_stages(task, model, stages)
    stage_names(task, model, mods)  # checked as a stage would
    return model, False, [(f"stage{s}", m, s) for s, m in enumerate(mods)]


def _materialise(task: Task, cfg: JobConfig, sequential: bool, name: str, unit: nn.Module,
                 seed: int, device: torch.device) -> None:
    unit.to_empty(device="cpu")
    if sequential:
        init_unit(task, unit, seed, name)
    else:
        for i, (label, u) in enumerate(units(unit, name)):
            init_unit(task, u, derive_seed("stage", cfg.seed, seed, i), label)
    unit.to(device)


def profile_layers(task: Task, cfg: JobConfig, micro_batch: int, device: str = "cpu",
                   train_ds: Any = None, repeats: int = 3) -> list[dict]:
    """Per top-level layer (Sequential) or stage module (build_stages), for one micro-batch
    of `micro_batch` training items: params, param_bytes, activation_bytes (its output),
    saved_bytes (what autograd saves in its forward, parameters aside), forward_backward_s
    (median of `repeats` timed forward+backward of that layer alone, after one untimed).
    One layer is materialised at a time: its input is the previous layer's output."""
    dev = torch.device(device)
    _, sequential, todo = profile_units(task, cfg)
    ds = train_ds if train_ds is not None else task.build_dataset("train")
    m = max(1, micro_batch)
    sampler = GlobalSampler(len(ds), max(cfg.batch_size, m), cfg.seed)
    seeds = [("item", cfg.seed, k) for k in range(m)]
    batch = to_device(task.load_batch("train", ds, sampler.positions(0, m), seeds), dev)
    cap = head(task, lambda mod: task.loss(mod, batch), None)
    assert cap.args is not None
    x: Any = None
    out: list[dict] = []
    for k, (name, unit, seed) in enumerate(todo):
        first, last = k == 0, k == len(todo) - 1
        _materialise(task, cfg, sequential, name, unit, seed, dev)
        params = list(unit.parameters())
        unit.train()

        def forward():
            """(the output, the tensor to backward from, its gradient)."""
            inp = None
            if not first:
                inp = x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
            with autocast(cfg.precision, dev):
                if last:
                    tail = Tail(unit, inp) if not first else None
                    term = task.loss(tail if tail is not None else unit, batch)
                    y = tail.output if tail is not None else None
                    return y, term.value.float(), None
                y = unit(*cap.args[0], **cap.args[1]) if first else unit(inp)
            if not isinstance(y, torch.Tensor):
                raise TaskError(f"layer {name} ({type(unit).__name__}) returned {type(y).__name__}; "
                                "activations between pipeline stages must be a single tensor",
                                task.where("build_model"))
            return y, y, torch.ones_like(y)

        def step():
            y, root, grad = forward()
            if root.requires_grad:
                root.backward(grad)
            for p in params:
                p.grad = None
            return y

        saved = SavedBytes(params)
        with saved.hooks(0):
            y, root, grad = forward()
        saved_bytes = saved.held(0)
        if root.requires_grad:
            root.backward(grad)
        for p in params:
            p.grad = None
        times = []
        for _ in range(max(1, repeats)):
            _sync(dev)
            t0 = time.perf_counter()
            step()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        out.append({"name": name, "type": type(unit).__name__,
                    "params": sum(p.numel() for p in params),
                    "param_bytes": sum(p.numel() * p.element_size() for p in params),
                    "activation_bytes": nbytes(y), "saved_bytes": saved_bytes,
                    "forward_backward_s": statistics.median(times)})
        x = y.detach() if isinstance(y, torch.Tensor) else y
        del y, root, grad, saved, params
        unit.to_empty(device="meta")  # freed: the next layer is the only one materialised
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
