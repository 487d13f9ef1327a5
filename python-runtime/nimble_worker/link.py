"""The worker link's framing on fd 3 (docs/protocol.md, "Worker link").

Each frame: u32 LE header_len | u32 LE payload_len | header (UTF-8 JSON object) | payload.
"""

from __future__ import annotations

import json
import socket
import struct

PREFIX = struct.Struct("<II")
MAX_HEADER = 1 << 20  # 1 MiB of JSON is far more than any valid header needs


class LinkError(Exception):
    """A malformed frame: the link cannot be trusted any more."""


class LinkClosed(Exception):
    """The peer closed the socket cleanly, between two frames."""


class Link:
    """Blocking framed messages over a connected stream socket."""

    def __init__(self, sock: socket.socket, max_payload: int = 0xFFFFFFFF):
        self.sock = sock
        self.max_payload = max_payload

    def send(self, header: dict, payload: bytes | bytearray | memoryview | list = b"") -> None:
        """One frame; a list payload is sent part after part as one payload (no joined copy)."""
        parts = [memoryview(p).cast("B") for p in (payload if isinstance(payload, list) else [payload])]
        size = sum(len(p) for p in parts)
        head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
        if len(head) > MAX_HEADER:
            raise LinkError(f"header of {len(head)} bytes exceeds {MAX_HEADER}")
        if size > 0xFFFFFFFF:
            raise LinkError(f"payload of {size} bytes does not fit a u32")
        self.sock.sendall(PREFIX.pack(len(head), size) + head)
        for p in parts:
            if len(p):
                self.sock.sendall(p)

    def _read(self, n: int, at_boundary: bool = False) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                if at_boundary and got == 0:
                    raise LinkClosed()
                raise LinkError(f"truncated frame: socket closed after {got} of {n} bytes")
            got += k
        return buf

    def recv(self) -> tuple[dict, bytearray]:
        """Next (header, payload). Raises LinkClosed on a clean EOF, LinkError on a bad frame."""
        head_len, pay_len = PREFIX.unpack(self._read(PREFIX.size, at_boundary=True))
        if head_len == 0 or head_len > MAX_HEADER:
            raise LinkError(f"bad header length {head_len} (must be 1..{MAX_HEADER})")
        if pay_len > self.max_payload:
            raise LinkError(f"payload length {pay_len} exceeds {self.max_payload}")
        raw = self._read(head_len)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LinkError(f"header is not UTF-8 JSON: {e}") from None
        if not isinstance(header, dict) or not isinstance(header.get("op"), str):
            raise LinkError("header must be a JSON object with a string 'op'")
        # A fresh bytearray the caller owns: tensors are made on it without another copy.
        payload = self._read(pay_len) if pay_len else bytearray()
        return header, payload
