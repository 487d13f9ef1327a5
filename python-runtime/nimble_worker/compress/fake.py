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


def blockwise_quantize(buf: torch.Tensor, block: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """encode(buf) of a blockwise codec, with the TypeScript arithmetic: blocks from
    buf[0] (the last one zero-padded); scale = fround(absmax / qmax), at least 2^-149 (0 for
    an all-zero block); q = round(x / scale) in double, half away from zero, clamped to
    [-qmax, qmax]. Returns (scales: float32, one per block, NaN for a block holding NaN or
    +-Inf; q: int8, padded to whole blocks)."""
    n = buf.numel()
    x = torch.cat([buf.reshape(-1).to(torch.float32), torch.zeros((-n) % block)]).view(-1, block)
    bad = ~torch.isfinite(x).all(dim=1, keepdim=True)
    amax = x.abs().amax(dim=1, keepdim=True).double()
    scale = (amax / qmax).float().double()  # fround(absmax / qmax)
    scale = torch.where((amax > 0) & (scale == 0), torch.full_like(scale, 2.0 ** -149), scale)
    safe = torch.where((scale > 0) & ~bad, scale, torch.ones_like(scale))
    v = torch.where(bad, torch.zeros_like(x, dtype=torch.float64), x.double() / safe)
    a = v.abs()
    t = a.trunc()
    r = (t + (a - t >= 0.5).double()).clamp(max=qmax)  # exact: a - trunc(a) is exact
    q = torch.where(v < 0, -r, r) + 0.0  # + 0.0: -0 becomes +0, as the int arrays store it
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    return scale.reshape(-1).float(), q.reshape(-1).to(torch.int8)


def blockwise_dequantize(scales: torch.Tensor, q: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """decode: fround(q x scale) (exact in double) for the first `n` values; a NaN scale
    (a non-finite block) gives NaN for the whole block."""
    x = q.reshape(-1, block).double() * scales.reshape(-1, 1).double()
    return x.float().reshape(-1)[:n]


def _blockwise(buf: torch.Tensor, block: int, qmax: int) -> torch.Tensor:
    """decode(encode(buf)) of a blockwise codec (float32 out)."""
    return blockwise_dequantize(*blockwise_quantize(buf, block, qmax), buf.numel(), block)


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


class PipeAborted(Exception):
    """Another member of a PipeGroup failed: this one's wait is abandoned."""


class PipeGroup:
    """An in-process group for pipeline parallelism: each of `ranks` runs in its own thread
    with a PipeComm whose collectives meet the other members of their group (None: every
    rank; "stage": the ranks of the same `stage_of`), summed in rank order so that every
    member gets the same bits, and whose point-to-point messages are buffered by (from, to,
    tag): a send never waits, a receive waits for its message."""

    def __init__(self, ranks, stage_of: dict[int, int], timeout: float = 60.0):
        self.ranks = sorted(ranks)
        self.stage_of = dict(stage_of)
        self.timeout = timeout
        self.cond = threading.Condition()
        self._rounds: dict[tuple, dict] = {}
        self._seq: dict[tuple, int] = {}
        self._mail: dict[tuple[int, int, str], list[bytes]] = {}
        self.failed: BaseException | None = None
        self.log: list[tuple] = []
        """(kind, group, rank or size, ...) of every collective and message, in order."""

    def member(self, rank: int) -> "PipeFakeComm":
        return PipeFakeComm(self, rank)

    def members(self, rank: int, group: str | None) -> list[int]:
        if group is None:
            return self.ranks
        if group != "stage":
            raise ValueError(f"unknown group {group!r}")
        return [r for r in self.ranks if self.stage_of[r] == self.stage_of[rank]]

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        if not self.cond.wait_for(lambda: ready() or self.failed is not None, self.timeout):
            raise TimeoutError(f"pipe group: {what} timed out after {self.timeout} s")
        if not ready():
            raise PipeAborted(f"pipe group: {what} abandoned: another member failed")

    def _meet(self, rank: int, group: str | None, item: Any, combine: Callable[[list], Any], what: str) -> Any:
        members = self.members(rank, group)
        gkey = (group, tuple(members))
        with self.cond:
            seq = self._seq.get((rank, gkey), 0)
            self._seq[(rank, gkey)] = seq + 1
            slot = self._rounds.setdefault((gkey, seq), {"items": {}, "result": None, "left": len(members)})
            slot["items"][rank] = item
            if len(slot["items"]) == len(members):
                slot["result"] = (combine([slot["items"][r] for r in members]),)
                self.log.append((what, group, tuple(members)))
                self.cond.notify_all()
            self._wait(lambda: slot["result"] is not None, f"{what} {seq} of {members}")
            slot["left"] -= 1
            if slot["left"] == 0:
                del self._rounds[(gkey, seq)]
            return slot["result"][0]

    def allreduce(self, rank: int, buf: torch.Tensor, codec: str, group: str | None) -> torch.Tensor:
        assert buf.dtype == torch.float32 and buf.dim() == 1 and buf.device.type == "cpu"

        def combine(parts):
            if len({p.numel() for p in parts}) != 1:
                raise ValueError(f"all-reduce sizes differ: {[p.numel() for p in parts]}")
            out = torch.zeros_like(parts[0])
            for p in parts:  # rank order: bitwise the same on every member
                out += p
            return out
        return self._meet(rank, group, encode(buf, codec), combine, "allreduce").clone()

    def allgather(self, rank: int, blob: bytes, group: str | None) -> list[bytes]:
        return list(self._meet(rank, group, bytes(blob), list, "allgather"))

    def send(self, rank: int, to: int, tag: str, payload: bytes) -> None:
        with self.cond:
            if to not in self.stage_of:
                raise ValueError(f"rank {rank} sends to rank {to}, not a member")
            self._mail.setdefault((rank, to, tag), []).append(bytes(payload))
            self.log.append(("send", rank, to, tag, len(payload)))
            self.cond.notify_all()

    def recv(self, rank: int, frm: int, tag: str) -> bytearray:
        key = (frm, rank, tag)
        with self.cond:
            self._wait(lambda: bool(self._mail.get(key)), f"rank {rank} receiving {tag} from {frm}")
            box = self._mail[key]
            data = box.pop(0)
            if not box:
                del self._mail[key]
            return bytearray(data)

    def pending_messages(self) -> list[tuple[int, int, str]]:
        """(from, to, tag) of messages sent and never received."""
        with self.cond:
            return sorted(self._mail)

    def run(self, fn: Callable[[int], Any]) -> dict[int, Any]:
        """Runs fn(rank) in one thread per rank; re-raises the first failure."""
        results: dict[int, Any] = {}
        errors: list[BaseException] = []

        def go(r):
            try:
                results[r] = fn(r)
            except BaseException as e:  # noqa: BLE001
                with self.cond:
                    errors.append(e)
                    if self.failed is None:
                        self.failed = e
                    self.cond.notify_all()
        threads = [threading.Thread(target=go, args=(r,)) for r in self.ranks]
        [t.start() for t in threads]
        [t.join() for t in threads]
        real = [e for e in errors if not isinstance(e, PipeAborted)]
        if real or errors:
            raise (real or errors)[0]
        return results


class PipeFakeComm:
    def __init__(self, group: PipeGroup, rank: int):
        self.group, self.rank = group, rank
        self.world_size = len(group.ranks)

    def allreduce(self, buf: torch.Tensor, codec: str = "f32", group: str | None = None) -> torch.Tensor:
        return self.group.allreduce(self.rank, buf, codec, group)

    def allgather(self, blob: bytes, group: str | None = None) -> list[bytes]:
        return self.group.allgather(self.rank, blob, group)

    def send(self, to: int, tag: str, payload: bytes) -> None:
        self.group.send(self.rank, to, tag, payload)

    def recv(self, frm: int, tag: str) -> bytearray:
        return self.group.recv(self.rank, frm, tag)
