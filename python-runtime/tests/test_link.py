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


# ---- the shared buffer (docs/protocol.md, "Shared buffer") ------------------------------

def memfd():
    """What a provider makes: a memfd sealed against shrinking."""
    import fcntl
    import os
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


class SharedProvider(threading.Thread):
    """Serves all-reduces as a ring of two equal workers would: the sum is twice the input,
    made in the shared buffer (its own mapping of the file) or in the payload."""

    def __init__(self, link, fd):
        super().__init__(daemon=True)
        self.link, self.fd, self.seen = link, fd, []

    def run(self):
        import mmap
        import os

        import torch
        while True:
            try:
                h, p = self.link.recv()
            except (LinkClosed, LinkError, OSError):
                return
            self.seen.append((h, len(p)))
            n = h["count"]
            reply = {"op": "allreduce_result", "id": h["id"], "dtype": "float32", "count": n,
                     "codec": h["codec"]}
            if h.get("shared"):
                assert len(p) == 0 and os.fstat(self.fd).st_size >= 4 * n
                m = mmap.mmap(self.fd, 4 * n)
                torch.frombuffer(m, dtype=torch.float32).mul_(2)
                self.link.send({**reply, "shared": True})
            else:
                self.link.send(reply, (torch.frombuffer(bytearray(p), dtype=torch.float32) * 2).numpy())


def shared_comm():
    import os

    from nimble_worker.comm import LinkComm
    from nimble_worker.shared import SharedBuffer
    a, b = socket.socketpair()
    fd = memfd()
    provider = SharedProvider(Link(b), os.dup(fd))
    provider.start()
    return LinkComm(Link(a), 2, lambda h: None, shared=SharedBuffer(fd)), provider


def test_a_staged_buffer_is_summed_in_place_and_nothing_travels_on_the_socket():
    import torch

    from nimble_worker.comm import pack_into, staging, unpack_from
    comm, provider = shared_comm()
    grads = [torch.arange(6, dtype=torch.float32).view(2, 3), torch.full((5,), -1.5)]
    buf = staging(comm, 11)
    assert comm.shared.owns(buf)
    pack_into(buf, grads)
    summed = comm.allreduce(buf)
    assert summed is buf  # in place, in the shared buffer
    unpack_from(summed, grads)
    assert grads[0].tolist() == [[0, 2, 4], [6, 8, 10]] and grads[1].tolist() == [-3.0] * 5
    assert [(h["shared"], size) for h, size in provider.seen] == [(True, 0)]
    # The same memory every step; a larger all-reduce grows the file, never shrinks it.
    assert staging(comm, 11).data_ptr() == buf.data_ptr()
    big = staging(comm, 1 << 20)
    big.fill_(1.0)
    assert float(comm.allreduce(big).sum()) == 2.0 * (1 << 20)


def test_a_callers_own_buffer_is_left_as_it_was():
    import torch

    from nimble_worker.comm import FnComm
    comm, provider = shared_comm()
    mine = torch.tensor([1.0, 2.0, 3.0])
    out = comm.allreduce(mine, "int8")
    assert mine.tolist() == [1.0, 2.0, 3.0] and out.tolist() == [2.0, 4.0, 6.0]
    assert out.data_ptr() != comm.shared.floats(3).data_ptr()  # the caller's to keep
    assert provider.seen[-1][0]["shared"] and provider.seen[-1][0]["codec"] == "int8"
    # Without a shared buffer the same call goes over the socket, with the same sums.
    a, b = socket.socketpair()
    plain_provider = SharedProvider(Link(b), -1)
    plain_provider.start()
    from nimble_worker.comm import LinkComm
    plain = LinkComm(Link(a), 2, lambda h: None)
    assert plain.allreduce(mine).tolist() == out.tolist()
    assert plain_provider.seen[-1] == ({"op": "allreduce", "id": 0, "dtype": "float32", "count": 3,
                                        "codec": "f32", "attempt": 0}, 12)
    # The dense path gives the same gradients whichever Comm carries it.
    from nimble_worker.compress import dense_allreduce
    g1 = [torch.randn(4, 3), torch.randn(7)]
    g2 = [g.clone() for g in g1]
    r1 = dense_allreduce(comm, ["a", "b"], g1, "f32", False)
    r2 = dense_allreduce(FnComm(lambda t: t * 2, 2), ["a", "b"], g2, "f32", False)
    assert all(torch.equal(x, y) for x, y in zip(r1.grads, r2.grads))


def test_a_poisoned_step_is_seen_in_the_shared_buffer():
    import torch

    from nimble_worker.compress import dense_allreduce
    comm, _ = shared_comm()
    res = dense_allreduce(comm, ["w"], [torch.ones(8)], "f32", poison=True)
    assert res.skipped


def test_a_file_that_cannot_grow_sends_over_the_socket():
    import os

    import torch

    from nimble_worker.comm import LinkComm
    from nimble_worker.shared import SharedBuffer
    a, b = socket.socketpair()
    ro = os.open("/dev/null", os.O_RDONLY)  # not a file it can grow
    provider = SharedProvider(Link(b), -1)
    provider.start()
    comm = LinkComm(Link(a), 2, lambda h: None, shared=SharedBuffer(ro))
    assert comm.allreduce(torch.ones(4)).tolist() == [2.0] * 4
    assert "shared" not in provider.seen[-1][0] and provider.seen[-1][1] == 16
