"""Streaming DiLoCo's fragments: the model's top-level modules split into contiguous
groups of about equal size, one group synced per round (strategies/diloco.py)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..config import ConfigError

CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def units(model: nn.Module, names: Sequence[str]) -> list[tuple[str, list[int]]]:
    """The model's top-level modules that hold trainable parameters, in order, each with
    the indices (into `names`, the trainable parameters) of its parameters. A top-level
    ModuleList / Sequential / ModuleDict (or a root that is one) stands for its children,
    so a stack of blocks gives one unit per block; parameters directly on the root go
    with the first unit."""
    prefixes: list[str] = []
    for name, child in model.named_children():
        if isinstance(child, CONTAINERS):
            prefixes += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            prefixes.append(name)
    owned: dict[str, list[int]] = {p: [] for p in prefixes}
    loose: list[int] = []  # on the root itself (or on a container, outside its children)
    for i, name in enumerate(names):
        owner = next((p for p in prefixes if name.startswith(p + ".")), None)
        (owned[owner] if owner is not None else loose).append(i)
    found = [(p, idx) for p, idx in owned.items() if idx]
    if not found:
        return [("(root)", loose)] if loose else []
    first, idx = found[0]
    found[0] = (first, sorted(loose + idx))
    return found


def balanced_split(sizes: Sequence[int], groups: int) -> list[int]:
    """Where to cut `sizes` (positive) into `groups` contiguous non-empty runs so that the
    largest run's sum is as small as it can be: the smallest cap that greedy runs fit in
    `groups` of (found by bisection: exact), then runs filled up to it, cut early only
    where every unit left must start a run. Deterministic, so every worker finds the same
    split. Returns each run's first index."""
    n = len(sizes)
    assert 1 <= groups <= n

    def runs_under(cap: int) -> int:
        count, acc = 1, 0
        for s in sizes:
            count, acc = (count + 1, s) if acc + s > cap else (count, acc + s)
        return count

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if runs_under(mid) <= groups else (mid + 1, hi)
    starts, acc = [0], sizes[0]
    for i in range(1, n):
        more = groups - len(starts)  # runs still to start
        if more > 0 and (acc + sizes[i] > lo or n - i == more):
            starts.append(i)
            acc = sizes[i]
        else:
            acc += sizes[i]
    return starts


def partition(model: nn.Module, names: Sequence[str], numels: Sequence[int],
              fragments: int) -> list[list[int]]:
    """The trainable parameters (indices into `names`) of each of `fragments` fragments:
    contiguous runs of the model's units, balanced by parameter count. A ConfigError
    (strategy.fragments) when the model has fewer units than that."""
    found = units(model, names)
    if fragments > len(found):
        listed = ", ".join(p for p, _ in found[:12]) + (", ..." if len(found) > 12 else "")
        raise ConfigError("strategy.fragments",
                          f"strategy.fragments {fragments} is more than the model's "
                          f"{len(found)} top-level modules with trainable parameters "
                          f"({listed or 'none'})")
    starts = balanced_split([sum(numels[i] for i in idx) for _, idx in found], fragments)
    ends = starts[1:] + [len(found)]
    return [sorted(i for _, idx in found[a:b] for i in idx) for a, b in zip(starts, ends)]
