"""How a worker talks to the other workers: the `Comm` protocol and its adapters.

Everything that needs the other replicas (the compressors, the strategies, state
hand-offs) goes through a `Comm`:

- `allreduce(buf, codec="f32")`: elementwise sum of a flat float32 CPU tensor over all
  workers (lossy on the wire for codec f16 / bf16 / int8 / int4); bitwise identical
  everywhere, and non-finite wherever any input was. A new tensor the caller owns, `buf`
  left as it was, except for a buffer from `staging(comm, n)`: that one is summed in place
  where the Comm can (the returned tensor may be `buf` itself).
- `allgather(blob) -> [blob of rank 0, rank 1, ...]`.
- `world_size`: the members of the ring now (fewer than the job's ranks once some left).

Under pipeline parallelism (`PipeComm`) collectives take a `group` (None: the whole ring;
"stage": this rank's stage replicas), and `send(to, tag, payload)` / `recv(frm, tag)`
carry activations between neighbouring stages (`pipe_send` / `pipe_recv` on the link).

Adapters: `LinkComm` (the provider over fd 3, what workers run), `FnComm` (a plain
`allreduce(buf) -> sum` callable, for tests and single-process runs), `TimedComm`
(counts the seconds spent in collectives), `GroupComm` (one group's collectives as a
plain Comm). `compress.fake.FakeGroup` is the in-process group of threads used by tests
and the DDP oracle; `compress.fake.PipeGroup` the same with stage groups and messages.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import torch

from .link import Link, LinkError
from .shared import SharedBuffer, SharedBufferError


def staging(comm, count: int) -> torch.Tensor:
    """A flat float32 CPU buffer of `count` elements for the caller to fill and then pass
    to `comm.allreduce`: where the Comm shares memory with its provider (LinkComm with a
    shared buffer), a view of it, summed in place without a copy on either side (the sum is
    valid until the Comm's next collective: copy it out); else a fresh tensor."""
    get = getattr(comm, "staging", None)
    buf = get(count) if get is not None else None
    return buf if buf is not None else torch.empty(count, dtype=torch.float32)


def pack_into(buf: torch.Tensor, tensors) -> None:
    """`tensors` (any device, any float dtype) one after another into flat `buf`."""
    at = 0
    for t in tensors:
        n = t.numel()
        buf[at:at + n].copy_(t.detach().reshape(-1))
        at += n


def unpack_from(buf: torch.Tensor, tensors) -> None:
    """The inverse of pack_into: each of `tensors` takes its part of `buf`, in place."""
    at = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(buf[at:at + n].view(t.shape))
            at += n


class Comm(Protocol):
    world_size: int

    def allreduce(self, buf: torch.Tensor, codec: str = "f32") -> torch.Tensor: ...

    def allgather(self, blob: bytes) -> list[bytes]: ...


class PipeComm(Comm, Protocol):
    """A Comm of pipeline parallelism: collectives may run on a `group` (None: the whole
    ring; "stage": this rank's stage replicas), and point-to-point messages go between
    ranks under a tag (buffered: a send does not wait for its receive)."""

    def allreduce(self, buf: torch.Tensor, codec: str = "f32", group: str | None = None) -> torch.Tensor: ...

    def allgather(self, blob: bytes, group: str | None = None) -> list[bytes]: ...

    def send(self, to: int, tag: str, payload: bytes) -> None: ...

    def recv(self, frm: int, tag: str) -> bytearray: ...


GROUPS = (None, "stage")


def _check_group(group: str | None) -> None:
    if group not in GROUPS:
        raise ValueError(f"unknown collective group {group!r} (None or 'stage')")


class GroupComm:
    """A Comm whose collectives all run on one group of `inner` (e.g. the compressor of a
    pipeline stage, or a state hand-off between a stage's replicas)."""

    def __init__(self, inner, group: str | None, world_size: int = 1):
        _check_group(group)
        self.inner, self.group, self.world_size = inner, group, world_size

    def allreduce(self, buf: torch.Tensor, codec: str = "f32") -> torch.Tensor:
        return self.inner.allreduce(buf, codec, group=self.group)

    def staging(self, count: int) -> torch.Tensor | None:
        get = getattr(self.inner, "staging", None)
        return get(count) if get is not None else None

    def allgather(self, blob: bytes) -> list[bytes]:
        return self.inner.allgather(blob, group=self.group)


def _quiet(header: dict) -> bool:
    """A commit sent while a round ordered ahead runs (no reply)."""
    return header["op"] == "decide" and header.get("quiet") is True and header.get("verdict") == "commit"


class StepAborted(Exception):
    """A collective of this round was abandoned: a ring member was lost. Raised by the
    worker's Comm; the strategy's round then leaves no trace. `step` is the round the
    abort decision names (with orders ahead, the round before this one's)."""

    def __init__(self, step: int | None = None):
        super().__init__(f"step {step} aborted")
        self.step = step


class Stop(Exception):
    """The provider sent `stop` (also while a collective waits for its result)."""


class FnComm:
    """A Comm around a plain `allreduce(buf) -> sum` callable (float32 only). With one
    worker, allgather is the identity; with more it is not available."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], world_size: int = 1):
        self.fn, self.world_size = fn, world_size

    def allreduce(self, buf: torch.Tensor, codec: str = "f32", group: str | None = None) -> torch.Tensor:
        self._group(group)
        if codec != "f32" and self.world_size == 1:
            from .compress.fake import encode
            return encode(buf, codec)
        if codec != "f32":
            raise ValueError(f"this all-reduce callable only takes float32, not {codec}")
        return self.fn(buf)

    def allgather(self, blob: bytes, group: str | None = None) -> list[bytes]:
        self._group(group)
        if self.world_size != 1:
            raise ValueError("this communicator has no allgather")
        return [bytes(blob)]

    def _group(self, group: str | None) -> None:
        # One worker: its stage group is itself. With more, the callable is the whole ring's.
        _check_group(group)
        if group is not None and self.world_size != 1:
            raise ValueError("this all-reduce callable has no stage groups")

    def send(self, to: int, tag: str, payload: bytes) -> None:
        raise ValueError("this communicator has no point-to-point messages")

    def recv(self, frm: int, tag: str) -> bytearray:
        raise ValueError("this communicator has no point-to-point messages")


def as_comm(x, world_size: int) -> Comm:
    return x if hasattr(x, "allgather") else FnComm(x, world_size)


class TimedComm:
    """Counts the seconds spent inside collectives and point-to-point messages (`comm_s`
    of a report)."""

    def __init__(self, inner: Comm):
        self.inner, self.seconds = inner, 0.0

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    def staging(self, count: int) -> torch.Tensor | None:
        get = getattr(self.inner, "staging", None)
        return get(count) if get is not None else None

    def allreduce(self, buf: torch.Tensor, codec: str = "f32", group: str | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        try:  # a Comm without groups is called as before
            return self.inner.allreduce(buf, codec) if group is None \
                else self.inner.allreduce(buf, codec, group=group)
        finally:
            self.seconds += time.perf_counter() - t0

    def allgather(self, blob: bytes, group: str | None = None) -> list[bytes]:
        t0 = time.perf_counter()
        try:
            return self.inner.allgather(blob) if group is None else self.inner.allgather(blob, group=group)
        finally:
            self.seconds += time.perf_counter() - t0

    def send(self, to: int, tag: str, payload: bytes) -> None:
        t0 = time.perf_counter()
        try:
            self.inner.send(to, tag, payload)
        finally:
            self.seconds += time.perf_counter() - t0

    def recv(self, frm: int, tag: str) -> bytearray:
        t0 = time.perf_counter()
        try:
            return self.inner.recv(frm, tag)
        finally:
            self.seconds += time.perf_counter() - t0


class LinkComm:
    """Collectives carried by the provider: each request goes out on the worker link and
    waits for its result (docs/protocol.md, "Worker link"). While it waits, `set_speed`
    is handed to `on_set_speed`, `stop` raises Stop and an abort decision (`decide` with
    verdict `abort`) raises StepAborted."""

    def __init__(self, link: Link, world_size: int, on_set_speed: Callable[[dict], None],
                 shared: SharedBuffer | None = None):
        self.link, self.world_size, self.on_set_speed = link, world_size, on_set_speed
        self.shared = shared
        """The buffer shared with the provider (every all-reduce goes through it), or None."""
        self.next_id = 0
        self._unacked: list[int] = []
        """Ids of sends not yet acknowledged, oldest first."""
        # The provider's number for the step attempt now running: collectives carry it, so
        # that requests of an abandoned attempt are never served on a re-formed ring.
        self.attempt = 0
        # Orders ahead (docs/protocol.md): round orders that arrived while a collective
        # waited, served next; and the first attempt still alive (an abort ends the rest).
        self.held: list[tuple[dict, bytearray]] = []
        self.live_from = 0
        self.round_ops: frozenset[str] = frozenset()
        self.on_decision: Callable[[dict], None] = lambda h: None

    def next_order(self) -> tuple[dict, bytearray]:
        """The next order to serve: one held while a collective waited, else the link's."""
        return self.held.pop(0) if self.held else self.link.recv()

    def aborted(self, header: dict) -> None:
        """An abort decision: every attempt the provider had started before it is over."""
        attempt = header.get("attempt")
        if isinstance(attempt, int) and not isinstance(attempt, bool):
            self.live_from = max(self.live_from, attempt)

    SEND_WINDOW = 4
    """Point-to-point sends the provider may hold unacknowledged: a worker goes on computing
    while its activations travel, and waits only when this many are still on their way."""

    def _reply(self, op: str, rid: int) -> tuple[dict, bytearray]:
        header, payload = self.link.recv()
        # set_speed may arrive at any time (no reply); a send's pipe_sent arrives in order.
        while header["op"] == "set_speed" or header["op"] in self.round_ops or _quiet(header) or \
                (header["op"] == "pipe_sent" and not (op == "pipe_sent" and header.get("id") == rid)):
            if header["op"] == "set_speed":
                self.on_set_speed(header)
            elif _quiet(header):  # the decision of the round applied ahead of this one
                self.on_decision(header)
            elif header["op"] in self.round_ops:  # the next round, ordered ahead
                if len(self.held) >= 2:
                    raise LinkError(f"{header['op']} {header.get('step')} ordered while two rounds are held")
                self.held.append((header, payload))
            else:
                self._acked(header, payload)
            header, payload = self.link.recv()
        if header["op"] == "stop":
            raise Stop()
        if header["op"] == "decide" and header.get("verdict") == "abort":
            # A ring member was lost: this round is abandoned, and its sends with it (the
            # provider drops what it had not sent; what it had was acknowledged before this).
            self._unacked.clear()
            self.aborted(header)
            raise StepAborted(header.get("step") if isinstance(header.get("step"), int) else None)
        if header["op"] != op or header.get("id") != rid:
            raise LinkError(f"expected {op} {rid}, got {header['op']} id={header.get('id')}")
        return header, payload

    def _id(self) -> int:
        rid = self.next_id
        self.next_id += 1
        return rid

    def staging(self, count: int) -> torch.Tensor | None:
        """The shared buffer's first `count` elements (see `staging` above), or None when
        there is none (or it cannot grow to that size)."""
        if self.shared is None or count == 0:
            return None
        try:
            return self.shared.floats(count)
        except SharedBufferError:
            return None  # it could not grow: this one goes over the socket

    def allreduce(self, buf: torch.Tensor, codec: str = "f32", group: str | None = None) -> torch.Tensor:
        _check_group(group)
        rid, count = self._id(), buf.numel()
        header = {"op": "allreduce", "id": rid, "dtype": "float32", "count": count,
                  "codec": codec, "attempt": self.attempt}
        if group is not None:
            header["group"] = group
        staged = self.shared is not None and count > 0 and self.shared.owns(buf)
        view = buf if staged else self.staging(count)
        if view is not None:
            if not staged:  # the caller keeps its buffer: a copy goes in, a copy comes out
                view.copy_(buf.detach().reshape(-1))
            header["shared"] = True
            self.link.send(header)
        else:
            # The tensor's own memory goes to the socket (no bytes copy of the gradient).
            self.link.send(header, buf.detach().contiguous().numpy())
        header, payload = self._reply("allreduce_result", rid)
        want = 0 if view is not None else 4 * count
        if header.get("dtype") != "float32" or header.get("count") != count \
                or header.get("codec", codec) != codec or len(payload) != want \
                or bool(header.get("shared")) != (view is not None):
            raise LinkError(f"allreduce_result {rid}: expected {count} float32 "
                            f"({'in the shared buffer' if view is not None else f'{want} bytes'}), "
                            f"got dtype={header.get('dtype')} count={header.get('count')} "
                            f"codec={header.get('codec')} shared={header.get('shared')} "
                            f"and {len(payload)} bytes")
        if view is not None:
            return view if staged else view.clone()
        if count == 0:
            return torch.zeros(0, dtype=torch.float32)
        return torch.frombuffer(payload, dtype=torch.float32)  # payload: ours, writable

    def allgather(self, blob: bytes, group: str | None = None) -> list[bytes]:
        _check_group(group)
        rid = self._id()
        header = {"op": "allgather", "id": rid, "size": len(blob), "attempt": self.attempt}
        if group is not None:
            header["group"] = group
        self.link.send(header, blob)
        header, payload = self._reply("allgather_result", rid)
        sizes = header.get("sizes")
        # A stage's replicas are the provider's to count: at least this worker.
        members_ok = isinstance(sizes, list) and (len(sizes) == self.world_size if group is None
                                                  else 1 <= len(sizes) <= max(1, self.world_size))
        if not members_ok or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes) \
                or sum(sizes) != len(payload):
            who = f"{self.world_size} workers" if group is None else f"at most {self.world_size} stage replicas"
            raise LinkError(f"allgather_result {rid}: sizes {sizes!r} do not split "
                            f"{len(payload)} bytes between {who}")
        out, at = [], 0
        for s in sizes:
            out.append(payload[at:at + s])
            at += s
        return out

    def send(self, to: int, tag: str, payload: bytes) -> None:
        """`payload` for rank `to` under `tag`; returns once it is on the link to the
        provider, which acknowledges it (`pipe_sent`) when it is on its way to `to`: with
        SEND_WINDOW sends unacknowledged, this waits for the oldest."""
        rid = self._id()
        self.link.send({"op": "pipe_send", "id": rid, "to": int(to), "tag": tag,
                        "size": len(payload), "attempt": self.attempt}, payload)
        self._unacked.append(rid)
        while len(self._unacked) > self.SEND_WINDOW:
            self._acked(*self._reply("pipe_sent", self._unacked[0]))

    def flush(self) -> None:
        """Wait until every send is acknowledged (before a reply: nothing of a round may
        arrive after it)."""
        while self._unacked:
            self._acked(*self._reply("pipe_sent", self._unacked[0]))

    def _acked(self, header: dict, body: bytearray) -> None:
        rid = header.get("id")
        if not self._unacked or rid != self._unacked[0]:
            raise LinkError(f"pipe_sent {rid}: expected {self._unacked[0] if self._unacked else 'none'}")
        if len(body):
            raise LinkError(f"pipe_sent {rid}: carries {len(body)} bytes (it carries none)")
        self._unacked.pop(0)

    def recv(self, frm: int, tag: str) -> bytearray:
        """The message rank `frm` sends under `tag` (`pipe_data`)."""
        rid = self._id()
        self.link.send({"op": "pipe_recv", "id": rid, "from": int(frm), "tag": tag,
                        "attempt": self.attempt})
        header, payload = self._reply("pipe_data", rid)
        if header.get("tag") != tag:
            raise LinkError(f"pipe_data {rid}: tag {header.get('tag')!r}, expected {tag!r}")
        return payload
