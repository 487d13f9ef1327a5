#!/usr/bin/env python3
"""The worker side of a gradient hand-off (worker -> provider -> worker), timed over a real
socket pair with an echo thread standing in for the provider: the worker link as it is
(the tensor's memory sent as is, the reply's bytearray taken as the tensor), beside the
copying path it replaced (tobytes, then bytes and bytearray copies of the reply).

  python scripts/bench_worker_link.py [--numel 939360]   # default: the char-LM's gradient
"""

import argparse
import os
import socket
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python-runtime"))
from nimble_worker.link import Link  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=939_360)
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args()
    worker_sock, provider_sock = socket.socketpair()
    worker, provider = Link(worker_sock), Link(provider_sock)

    def echo() -> None:
        while True:
            h, payload = provider.recv()
            if h["op"] == "stop":
                return
            provider.send({"op": "result"}, payload)

    threading.Thread(target=echo, daemon=True).start()
    grad = torch.randn(a.numel)

    def copying() -> torch.Tensor:
        worker.send({"op": "allreduce"}, grad.contiguous().numpy().tobytes())
        _, payload = worker.recv()
        return torch.frombuffer(bytearray(bytes(payload)), dtype=torch.float32)

    def direct() -> torch.Tensor:
        worker.send({"op": "allreduce"}, grad.detach().contiguous().numpy())
        _, payload = worker.recv()
        return torch.frombuffer(payload, dtype=torch.float32)

    print(f"{a.numel * 4 / 1e6:.2f} MB gradient, mean of {a.iters} round trips:")
    for name, f in [("copying (before)", copying), ("direct (now)", direct)] * 2:
        for _ in range(3):
            f()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            out = f()
        assert torch.equal(out, grad)
        print(f"  {name:17s} {(time.perf_counter() - t0) / a.iters * 1000:.2f} ms")
    worker.send({"op": "stop"})


if __name__ == "__main__":
    main()
