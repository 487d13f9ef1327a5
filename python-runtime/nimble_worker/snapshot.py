"""The replica's training state before a step applied ahead of its decision.

With orders ahead (docs/protocol.md, "Orders ahead"), a worker applies step t before the
coordinator has decided it, so that step t+1 starts at once; an abort of t must then put
the replica back exactly. The snapshot copies parameters, buffers and optimizer state into
buffers kept from step to step (no allocation per step once shapes are known), and the
small rest (schedule, learning rates, step counter, loss scale) by value.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[int, str, Any]]:
    """(parameter index, key, value) of every optimizer state entry, in a fixed order."""
    out = []
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                for key in sorted(state):
                    out.append((index, key, state[key]))
            index += 1
    return out


class StateSnapshot:
    def __init__(self) -> None:
        self._saved: list[torch.Tensor] = []
        self._layout: list[tuple[str, int, str]] = []
        """What each saved tensor is: ("param" | "buffer", index, "") or ("optim", param index, key)."""
        self._values: list[tuple[int, str, Any]] = []
        """Non-tensor optimizer state entries, by value."""
        self._groups: list[dict] = []
        self._rest: dict[str, Any] = {}

    def _live(self, replica) -> tuple[list[torch.Tensor], list[tuple[str, int, str]], list[tuple[int, str, Any]]]:
        tensors, layout, values = [], [], []
        for i, p in enumerate(replica.model.parameters()):
            tensors.append(p.data)
            layout.append(("param", i, ""))
        for i, b in enumerate(replica.model.buffers()):
            tensors.append(b.data)
            layout.append(("buffer", i, ""))
        for index, key, value in _optimizer_tensors(replica.optimizer):
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                layout.append(("optim", index, key))
            else:
                values.append((index, key, copy.deepcopy(value)))
        return tensors, layout, values

    def take(self, replica) -> None:
        tensors, layout, values = self._live(replica)
        reuse = layout == self._layout and all(
            s.shape == t.shape and s.dtype == t.dtype and s.device == t.device for s, t in zip(self._saved, tensors))
        with torch.no_grad():
            if reuse:
                for s, t in zip(self._saved, tensors):
                    s.copy_(t)
            else:
                self._saved = [t.detach().clone() for t in tensors]
        self._layout, self._values = layout, values
        self._groups = [copy.deepcopy({k: v for k, v in g.items() if k != "params"})
                        for g in replica.optimizer.param_groups]
        self._rest = {"schedule": copy.deepcopy(replica.scheduler.state_dict()),
                      "next_step": replica.next_step,
                      "loss_scale": copy.deepcopy(replica.loss_scale.state_dict())}

    def restore(self, replica) -> None:
        """Put the replica back as it was at `take`, bit for bit."""
        params = list(replica.model.parameters())
        buffers = list(replica.model.buffers())
        opt = replica.optimizer
        ordered = [p for g in opt.param_groups for p in g["params"]]
        rebuilt: dict[int, dict] = {}
        with torch.no_grad():
            for saved, (kind, index, key) in zip(self._saved, self._layout):
                if kind == "param":
                    params[index].data.copy_(saved)
                elif kind == "buffer":
                    buffers[index].data.copy_(saved)
                else:
                    live = opt.state.get(ordered[index], {}).get(key)
                    if isinstance(live, torch.Tensor) and live.shape == saved.shape and live.dtype == saved.dtype:
                        live.copy_(saved)
                        rebuilt.setdefault(index, {})[key] = live
                    else:
                        rebuilt.setdefault(index, {})[key] = saved.clone()
        for index, key, value in self._values:
            rebuilt.setdefault(index, {})[key] = copy.deepcopy(value)
        opt.state.clear()  # entries created since (a first step's momentum) go
        for index, state in rebuilt.items():
            opt.state[ordered[index]] = state
        for group, saved in zip(opt.param_groups, self._groups):
            group.update(copy.deepcopy(saved))
        replica.scheduler.load_state_dict(self._rest["schedule"])
        replica.next_step = self._rest["next_step"]
        replica.loss_scale.load_state_dict(self._rest["loss_scale"])
