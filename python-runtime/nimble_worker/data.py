"""The global batch sampler.

Global step t uses positions t*B .. t*B+B-1 of an infinite stream of sample indices.
Position p lies in epoch e = p // n at index perm_e[p % n], perm_e = randperm(n) drawn
from a generator seeded from (seed, e). The samples of a step therefore depend only on
(seed, t, B, n), never on how many workers there are or how the batch is shared.
Worker `rank` takes the contiguous run of positions starting at t*B + sum(shares[:rank]).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
from torch.utils.data import default_collate


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (same on every host)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class GlobalSampler:
    def __init__(self, n: int, batch_size: int, seed: int):
        if n <= 0:
            raise ValueError("the training dataset is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed("epoch", self.seed, epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        assert self._perm is not None
        return self._perm

    def positions(self, start: int, count: int) -> list[int]:
        """Dataset indices of stream positions start .. start+count-1."""
        out = []
        for p in range(start, start + count):
            out.append(int(self.perm(p // self.n)[p % self.n]))
        return out

    def indices(self, step: int, shares: Sequence[int], rank: int) -> list[int]:
        """This worker's dataset indices for global step `step`."""
        if sum(shares) != self.batch_size or any(s < 0 for s in shares):
            raise ValueError(f"shares {list(shares)} must be >= 0 and sum to {self.batch_size}")
        start = step * self.batch_size + sum(shares[:rank])
        return self.positions(start, shares[rank])


def collate(dataset: Any, indices: Sequence[int], fn=None) -> Any:
    """The items at `indices` as one batch: the task's collate(items), or torch's default."""
    items = [dataset[i] for i in indices]
    return fn(items) if fn is not None else default_collate(items)
