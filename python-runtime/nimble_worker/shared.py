"""The buffer a worker shares with its provider (docs/protocol.md, "Shared buffer").

The provider makes an anonymous memory file (a memfd, sealed against shrinking) and the
worker inherits it (the `init` order's `shared_fd`, fd 4). Every all-reduce is staged
there: the worker writes its elements at the start of the file and sends `allreduce` with
`shared: true` and no payload; the provider's collective sums them in place, over the same
pages, and `allreduce_result` (`shared: true`, no payload) says the sum is there. Nothing
of the buffer travels over the socket or is copied by the provider.

The file grows (never shrinks) to the largest all-reduce asked of it: for sync training the
gradient, 4 bytes a parameter, mapped here (so counted in this worker's memory) and reused
every step.
"""

from __future__ import annotations

import mmap
import os

import torch


class SharedBufferError(Exception):
    """The shared buffer cannot hold what was asked (the file could not grow)."""


class SharedBuffer:
    def __init__(self, fd: int):
        self.fd = fd
        self._map: mmap.mmap | None = None
        self._floats: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        """float32 elements mapped now."""
        return 0 if self._floats is None else self._floats.numel()

    def floats(self, count: int) -> torch.Tensor:
        """The first `count` float32 elements of the file, growing it first when it holds
        fewer. A view that stays valid (the file only grows; a larger mapping is a new one,
        over the same first pages); what it holds is overwritten by the next shared
        all-reduce."""
        if count > self.capacity:
            need = 4 * count
            try:
                if os.fstat(self.fd).st_size < need:
                    os.ftruncate(self.fd, need)
                    # Its pages now, so that running out shows as an error here, never as
                    # SIGBUS when a page is first touched.
                    os.posix_fallocate(self.fd, 0, need)
                m = mmap.mmap(self.fd, need, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                raise SharedBufferError(f"the shared buffer cannot hold {need} bytes: {e}") from None
            self._map = m
            self._floats = torch.frombuffer(m, dtype=torch.float32)
        assert self._floats is not None
        return self._floats[:count]

    def owns(self, t: torch.Tensor) -> bool:
        """Whether `t` is this buffer's first t.numel() elements (what `floats` gave)."""
        return (self._floats is not None and t.device.type == "cpu" and t.dtype == torch.float32
                and t.is_contiguous() and t.numel() <= self.capacity
                and t.data_ptr() == self._floats.data_ptr())
