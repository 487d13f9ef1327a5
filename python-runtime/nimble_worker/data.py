"""The global batch sampler.

Global step t uses positions t*B .. t*B+B-1 of an infinite stream of sample indices.
Position p lies in epoch e = p // n at index perm_e[p % n], perm_e = randperm(n) drawn
from a generator seeded from (seed, e). The samples of a step therefore depend only on
(seed, t, B, n), never on how many workers there are or how the batch is shared.
Worker `rank` takes the contiguous run of positions starting at t*B + sum(shares[:rank]).
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

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
        out: list[int] = []
        p, end = start, start + count
        while p < end:  # one slice per epoch the run of positions touches
            epoch, at = divmod(p, self.n)
            take = min(end - p, self.n - at)
            out += self.perm(epoch)[at:at + take].tolist()
            p += take
        return out

    def start(self, step: int, shares: Sequence[int], rank: int) -> int:
        """The stream position of this worker's first sample of global step `step`."""
        if sum(shares) != self.batch_size or any(s < 0 for s in shares):
            raise ValueError(f"shares {list(shares)} must be >= 0 and sum to {self.batch_size}")
        return step * self.batch_size + sum(shares[:rank])

    def indices(self, step: int, shares: Sequence[int], rank: int) -> list[int]:
        """This worker's dataset indices for global step `step`."""
        return self.positions(self.start(step, shares, rank), shares[rank])


def collate(dataset: Any, indices: Sequence[int], fn=None) -> Any:
    """The items at `indices` as one batch: the task's collate(items), or torch's default."""
    items = [dataset[i] for i in indices]
    return fn(items) if fn is not None else default_collate(items)


_item = threading.local()
"""The item being loaded on this thread: what seeds its generator, and the generator once made."""


@contextmanager
def item_seed(*parts: int | str) -> Iterator[None]:
    """While loading one item: `item_generator` gives a generator seeded from derive_seed(*parts)
    (made only if asked for: most datasets never ask)."""
    _item.parts, _item.generator = parts, None
    try:
        yield
    finally:
        _item.parts, _item.generator = (), None


def item_generator() -> torch.Generator:
    """For random augmentation in a task's Dataset.__getitem__: a generator seeded from the
    job's seed and the item's position in the global sample stream (validation items: from
    their index). Its draws are the same on any number of workers, with prefetch on or off,
    and differ from epoch to epoch. Outside Nimble's loading: torch's default generator."""
    if not getattr(_item, "parts", ()):
        return torch.default_generator
    if _item.generator is None:
        _item.generator = torch.Generator().manual_seed(derive_seed(*_item.parts))
    return _item.generator
