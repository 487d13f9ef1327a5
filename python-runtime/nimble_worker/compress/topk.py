"""Top-k sparsification with error feedback, over one allgather.

From `start_step` on, each worker adds its memory to its gradient (x = grad + memory,
flattened over all parameters), keeps the k = ceil(ratio x numel) entries of largest |x|
and sends them as a blob: u8 flag (1: this worker's step is bad) | k int32 LE indices |
k float32 LE values. Every worker adds the blobs into a zero buffer in rank order on the
CPU, so the result is bitwise the same everywhere. The memory is x minus what was sent
(x with the sent entries zeroed), so sum over workers of memories = sum of inputs - result.
Any flag set, or any non-finite value received, skips the step on every worker.
Steps before `start_step` use one plain float32 all-reduce.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from . import Comm, Compressor, Reduced, dense_allreduce, finite, local_nonfinite, unflat
from ..config import CompressionConfig


class TopK(Compressor):
    def __init__(self, cfg: CompressionConfig, comm: Comm,
                 named_shapes: Sequence[tuple[str, torch.Size]]):
        super().__init__(cfg, comm)
        self.numel = sum(int(math.prod(s)) for _, s in named_shapes)
        self.k = min(self.numel, math.ceil(cfg.ratio * self.numel))
        self.memory: torch.Tensor | None = None

    def reduce(self, step, names, grads, share, poison=False):
        c = self.cfg
        if step < c.start_step:
            return dense_allreduce(self.comm, names, grads, "f32", poison)
        bad = local_nonfinite(names, grads)
        x = torch.cat([g.detach().reshape(-1).to(torch.float32) for g in grads]) if grads \
            else torch.zeros(0)
        if c.error_feedback and self.memory is not None:
            x = x + self.memory.to(x.device)
        if poison or bad or not finite(x):
            blob = b"\x01"
            idx = None
        else:
            idx = torch.topk(x.abs(), self.k, sorted=False).indices
            vals = x[idx].cpu().numpy().astype("<f4")
            blob = b"\x00" + idx.cpu().numpy().astype("<i4").tobytes() + vals.tobytes()
        blobs = self.comm.allgather(blob)
        if len(blobs) != self.comm.world_size:
            raise ValueError(f"allgather returned {len(blobs)} blobs for "
                             f"{self.comm.world_size} workers")
        total = torch.zeros(self.numel, dtype=torch.float32)
        for r, b in enumerate(blobs):
            if len(b) < 1 or b[0] != 0:
                return Reduced(None, bad, 1)
            if (len(b) - 1) % 8:
                raise ValueError(f"topk blob of rank {r} has {len(b)} bytes")
            k = (len(b) - 1) // 8
            ri = torch.from_numpy(np.frombuffer(b, dtype="<i4", count=k, offset=1)
                                  .astype(np.int64))
            rv = torch.from_numpy(np.frombuffer(b, dtype="<f4", count=k, offset=1 + 4 * k)
                                  .astype(np.float32))
            if k and (int(ri.min()) < 0 or int(ri.max()) >= self.numel):
                raise ValueError(f"topk blob of rank {r} has an index out of range")
            if not finite(rv):
                return Reduced(None, bad, 1)
            total.index_add_(0, ri, rv)  # indices are unique within one blob: exact
        if c.error_feedback:
            assert idx is not None
            x = x.clone()
            x[idx] = 0
            self.memory = x
        return Reduced(unflat(total, grads), bad, 1)

    def mark(self):
        return self.memory  # replaced, never changed in place, by reduce()

    def rollback(self, mark) -> None:
        self.memory = mark

    def state_dict(self) -> dict:
        return {"method": "topk", "memory": None if self.memory is None else self.memory.cpu()}

    def load_state_dict(self, state: dict, same_worker: bool) -> None:
        if state.get("method") == "topk":
            self.memory = state["memory"] if same_worker else None
