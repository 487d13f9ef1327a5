#!/usr/bin/env python3
"""One rank of torch.distributed gloo's all-reduce for `npm run bench:ring`.

Started once per rank by scripts/bench-ring.mjs; reads one JSON command per line on stdin
and answers one JSON line on stdout:
  {"run": {"elements": L, "iters": K}} -> one warm-up all-reduce of L float32 values (all
      ranks hold rank + 1, so the sum is checked), then K timed ones:
      {"seconds": total for the K, "cpuSeconds": CPU time the process used in them, "correct": bool}
  {"exit": true} -> leaves the process group and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master", required=True, help="host:port of rank 0's store")
    p.add_argument("--ifname", default=None, help="network interface gloo uses (GLOO_SOCKET_IFNAME)")
    a = p.parse_args()
    if a.ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = a.ifname
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}", rank=a.rank, world_size=a.world)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if "exit" in msg:
            break
        run = msg["run"]
        elements, iters = int(run["elements"]), int(run["iters"])
        data = torch.full((elements,), float(a.rank + 1), dtype=torch.float32)
        dist.all_reduce(data)
        want = a.world * (a.world + 1) / 2
        correct = bool(data[0].item() == want and data[-1].item() == want)
        start = time.perf_counter()
        cpu = time.process_time()  # every thread of the process, user and system
        for _ in range(iters):
            dist.all_reduce(data)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu
        del data
        print(json.dumps({"seconds": seconds, "cpuSeconds": cpu_seconds, "correct": correct}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
