"""How a worker talks to the other workers: the `Comm` protocol and its adapters.

Everything that needs the other replicas (the compressors, the strategies, state
hand-offs) goes through a `Comm`:

- `allreduce(buf, codec="f32")`: elementwise sum of a flat float32 CPU tensor over all
  workers (lossy on the wire for codec f16 / bf16 / int8 / int4); bitwise identical
  everywhere, and non-finite wherever any input was.
- `allgather(blob) -> [blob of rank 0, rank 1, ...]`.
- `world_size`: the members of the ring now (fewer than the job's ranks once some left).

Adapters: `LinkComm` (the provider over fd 3, what workers run), `FnComm` (a plain
`allreduce(buf) -> sum` callable, for tests and single-process runs), `TimedComm`
(counts the seconds spent in collectives). `compress.fake.FakeGroup` is the in-process
group of threads used by tests and the DDP oracle.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import torch

from .link import Link, LinkError


class Comm(Protocol):
    world_size: int

    def allreduce(self, buf: torch.Tensor, codec: str = "f32") -> torch.Tensor: ...

    def allgather(self, blob: bytes) -> list[bytes]: ...


class StepAborted(Exception):
    """A collective of this round was abandoned: a ring member was lost. Raised by the
    worker's Comm; the strategy's round then leaves no trace."""


class Stop(Exception):
    """The provider sent `stop` (also while a collective waits for its result)."""


class FnComm:
    """A Comm around a plain `allreduce(buf) -> sum` callable (float32 only). With one
    worker, allgather is the identity; with more it is not available."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], world_size: int = 1):
        self.fn, self.world_size = fn, world_size

    def allreduce(self, buf: torch.Tensor, codec: str = "f32") -> torch.Tensor:
        if codec != "f32" and self.world_size == 1:
            from .compress.fake import encode
            return encode(buf, codec)
        if codec != "f32":
            raise ValueError(f"this all-reduce callable only takes float32, not {codec}")
        return self.fn(buf)

    def allgather(self, blob: bytes) -> list[bytes]:
        if self.world_size != 1:
            raise ValueError("this communicator has no allgather")
        return [bytes(blob)]


def as_comm(x, world_size: int) -> Comm:
    return x if hasattr(x, "allgather") else FnComm(x, world_size)


class TimedComm:
    """Counts the seconds spent inside collectives (`comm_s` of a report)."""

    def __init__(self, inner: Comm):
        self.inner, self.seconds = inner, 0.0

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    def allreduce(self, buf: torch.Tensor, codec: str = "f32") -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.inner.allreduce(buf, codec)
        finally:
            self.seconds += time.perf_counter() - t0

    def allgather(self, blob: bytes) -> list[bytes]:
        t0 = time.perf_counter()
        try:
            return self.inner.allgather(blob)
        finally:
            self.seconds += time.perf_counter() - t0


class LinkComm:
    """Collectives carried by the provider: each request goes out on the worker link and
    waits for its result (docs/protocol.md, "Worker link"). While it waits, `set_speed`
    is handed to `on_set_speed`, `stop` raises Stop and an abort decision (`decide` with
    verdict `abort`) raises StepAborted."""

    def __init__(self, link: Link, world_size: int, on_set_speed: Callable[[dict], None]):
        self.link, self.world_size, self.on_set_speed = link, world_size, on_set_speed
        self.next_id = 0
        # The provider's number for the step attempt now running: collectives carry it, so
        # that requests of an abandoned attempt are never served on a re-formed ring.
        self.attempt = 0

    def _reply(self, op: str, rid: int) -> tuple[dict, bytearray]:
        header, payload = self.link.recv()
        while header["op"] == "set_speed":  # may arrive at any time; no reply
            self.on_set_speed(header)
            header, payload = self.link.recv()
        if header["op"] == "stop":
            raise Stop()
        if header["op"] == "decide" and header.get("verdict") == "abort":
            raise StepAborted()  # a ring member was lost: this round is abandoned
        if header["op"] != op or header.get("id") != rid:
            raise LinkError(f"expected {op} {rid}, got {header['op']} id={header.get('id')}")
        return header, payload

    def allreduce(self, buf: torch.Tensor, codec: str = "f32") -> torch.Tensor:
        rid, count = self.next_id, buf.numel()
        self.next_id += 1
        # The tensor's own memory goes to the socket (no bytes copy of the gradient).
        self.link.send({"op": "allreduce", "id": rid, "dtype": "float32", "count": count,
                        "codec": codec, "attempt": self.attempt},
                       buf.detach().contiguous().numpy())
        header, payload = self._reply("allreduce_result", rid)
        if header.get("dtype") != "float32" or header.get("count") != count \
                or header.get("codec", codec) != codec or len(payload) != 4 * count:
            raise LinkError(f"allreduce_result {rid}: expected {count} float32 "
                            f"({4 * count} bytes), got dtype={header.get('dtype')} "
                            f"count={header.get('count')} codec={header.get('codec')} "
                            f"and {len(payload)} bytes")
        if count == 0:
            return torch.zeros(0, dtype=torch.float32)
        return torch.frombuffer(payload, dtype=torch.float32)  # payload: ours, writable

    def allgather(self, blob: bytes) -> list[bytes]:
        rid = self.next_id
        self.next_id += 1
        self.link.send({"op": "allgather", "id": rid, "size": len(blob),
                        "attempt": self.attempt}, blob)
        header, payload = self._reply("allgather_result", rid)
        sizes = header.get("sizes")
        if not isinstance(sizes, list) or len(sizes) != self.world_size \
                or not all(isinstance(s, int) and s >= 0 for s in sizes) \
                or sum(sizes) != len(payload):
            raise LinkError(f"allgather_result {rid}: sizes {sizes!r} do not split "
                            f"{len(payload)} bytes between {self.world_size} workers")
        out, at = [], 0
        for s in sizes:
            out.append(payload[at:at + s])
            at += s
        return out
