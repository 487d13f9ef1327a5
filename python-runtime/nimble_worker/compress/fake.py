"""An in-process group of workers for tests and for comparing against torch DDP: each
worker runs in its own thread and gets a `Comm` whose collectives meet at a barrier.

The lossy codecs are simulated per contribution (encode, decode, then a float32 sum in
rank order); the provider's real wire encoding lives in TypeScript (src/collective/codecs.ts),
and `encode` gives the same bits as its decode(encode(x)) (test/collective/codecParity.test.ts).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

INT8_BLOCK = 256
INT4_BLOCK = 64
# (values per block, largest |q|) of the blockwise codecs
BLOCKWISE = {"int8": (INT8_BLOCK, 127), "int4": (INT4_BLOCK, 7)}


def _blockwise(buf: torch.Tensor, block: int, qmax: int) -> torch.Tensor:
    """decode(encode(buf)) of a blockwise codec, with the TypeScript arithmetic: blocks
    from buf[0]; scale = fround(absmax / qmax), at least 2^-149 (0 for an all-zero block);
    q = round(x / scale) in double, half away from zero, clamped to [-qmax, qmax]; out =
    fround(q * scale); a block holding NaN or +-Inf becomes all NaN."""
    n = buf.numel()
    x = torch.cat([buf.to(torch.float32), torch.zeros((-n) % block)]).view(-1, block)
    bad = ~torch.isfinite(x).all(dim=1, keepdim=True)
    amax = x.abs().amax(dim=1, keepdim=True).double()
    scale = (amax / qmax).float().double()  # fround(absmax / qmax)
    scale = torch.where((amax > 0) & (scale == 0), torch.full_like(scale, 2.0 ** -149), scale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = x.double() / safe
    a = v.abs()
    t = a.trunc()
    r = (t + (a - t >= 0.5).double()).clamp(max=qmax)  # exact: a - trunc(a) is exact
    q = torch.where(v < 0, -r, r) + 0.0  # + 0.0: -0 becomes +0, as the int arrays store it
    out = torch.where(scale > 0, (q * scale).float(), torch.zeros_like(x))  # q x scale exact in double
    out = torch.where(bad, torch.full_like(x, float("nan")), out)
    return out.reshape(-1)[:n]


def encode(buf: torch.Tensor, codec: str) -> torch.Tensor:
    """What `buf` becomes after a trip through `codec` (float32 out), bit for bit what the
    provider's wire codec gives."""
    if codec == "f32":
        return buf.clone()
    if codec == "f16":
        return buf.to(torch.float16).to(torch.float32)
    if codec == "bf16":
        return buf.to(torch.bfloat16).to(torch.float32)
    if codec in BLOCKWISE:
        return _blockwise(buf, *BLOCKWISE[codec])
    raise ValueError(f"unknown codec {codec!r}")


class FakeGroup:
    def __init__(self, world_size: int, timeout: float = 60.0):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.slots: list[Any] = [None] * world_size
        self.log: list[tuple[str, int, str]] = []  # (kind, count, codec) as rank 0 saw them

    def member(self, rank: int) -> "FakeComm":
        return FakeComm(self, rank)

    def _exchange(self, rank: int, item: Any) -> list[Any]:
        self.slots[rank] = item
        self.barrier.wait()
        items = list(self.slots)
        self.barrier.wait()
        return items

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        """Runs fn(rank) in one thread per rank; re-raises the first failure."""
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException] = []

        def go(r):
            try:
                results[r] = fn(r)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=go, args=(r,)) for r in range(self.world_size)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        if real or errors:
            raise (real or errors)[0]
        return results


class FakeComm:
    def __init__(self, group: FakeGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def allreduce(self, buf: torch.Tensor, codec: str = "f32") -> torch.Tensor:
        assert buf.dtype == torch.float32 and buf.dim() == 1 and buf.device.type == "cpu"
        if self.rank == 0:
            self.group.log.append(("allreduce", buf.numel(), codec))
        parts = self.group._exchange(self.rank, encode(buf, codec))
        if len({p.numel() for p in parts}) != 1:
            raise ValueError(f"all-reduce sizes differ: {[p.numel() for p in parts]}")
        out = torch.zeros_like(parts[0])
        for p in parts:  # rank order: bitwise the same on every worker
            out += p
        return out

    def allgather(self, blob: bytes) -> list[bytes]:
        if self.rank == 0:
            self.group.log.append(("allgather", len(blob), ""))
        return [bytes(b) for b in self.group._exchange(self.rank, bytes(blob))]
