import json
import socket
import struct
import threading

import pytest

from nimble_worker.link import MAX_HEADER, Link, LinkClosed, LinkError


def pair():
    a, b = socket.socketpair()
    return Link(a), Link(b), a, b


def test_round_trip_including_large_payload():
    la, lb, a, b = pair()
    big = bytes(range(256)) * 20000  # 5 MB: larger than the socket buffer
    t = threading.Thread(target=lambda: [la.send({"op": "x", "n": 1, "s": "é"}),
                                         la.send({"op": "big", "count": len(big)}, big),
                                         la.send({"op": "empty"}, b"")])
    t.start()
    assert lb.recv() == ({"op": "x", "n": 1, "s": "é"}, b"")
    h, p = lb.recv()
    assert h == {"op": "big", "count": len(big)} and p == big
    assert lb.recv() == ({"op": "empty"}, b"")
    t.join()
    a.close()
    with pytest.raises(LinkClosed):
        lb.recv()


def test_frame_layout_is_little_endian_prefix():
    la, _, _, b = pair()
    la.send({"op": "a"}, b"\x01\x02")
    raw = b.recv(100)
    head = json.dumps({"op": "a"}, separators=(",", ":")).encode()
    assert raw == struct.pack("<II", len(head), 2) + head + b"\x01\x02"


@pytest.mark.parametrize("raw, msg", [
    (struct.pack("<II", MAX_HEADER + 1, 0), "bad header length"),
    (struct.pack("<II", 0, 0), "bad header length"),
    (struct.pack("<II", 9, 0) + b"{\"o", "truncated"),  # closed mid-header
    (struct.pack("<II", 2, 10) + b"{}", "'op'"),           # no op
    (struct.pack("<II", 4, 0) + b"nope", "not UTF-8 JSON"),
    (struct.pack("<II", 2, 0) + b"[]", "JSON object"),
    (struct.pack("<I", 5), "truncated"),                    # closed mid-prefix
])
def test_rejects_malformed_frames(raw, msg):
    _, lb, a, _ = pair()
    a.sendall(raw)
    a.close()
    with pytest.raises(LinkError, match=msg):
        lb.recv()


def test_truncated_payload_and_payload_limit():
    _, lb, a, _ = pair()
    head = b'{"op":"x"}'
    a.sendall(struct.pack("<II", len(head), 100) + head + b"abc")
    a.close()
    with pytest.raises(LinkError, match="truncated"):
        lb.recv()
    a, b = socket.socketpair()
    a.sendall(struct.pack("<II", len(head), 1 << 30) + head)
    with pytest.raises(LinkError, match="exceeds"):
        Link(b, max_payload=1 << 20).recv()
