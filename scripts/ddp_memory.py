#!/usr/bin/env python3
"""One rank of the torch DDP (gloo) reference for `npm run bench:memory`.

Plain DistributedDataParallel with its defaults (25 MB buckets, gradients not bucket
views), as a user would write it: the task's model (Nimble's seeded init), its data in
Nimble's global sample order with equal shares, SGD, `--steps` steps of `--batch-size`
global samples; then rank 0 saves the model (`--save`, as Nimble writes its final
weights). What the benchmark weighs is this process's memory; it prints one line at the
end (the last loss).
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python-runtime"))
os.environ.setdefault("NIMBLE_HOME", ROOT)

from nimble_worker.data import GlobalSampler, collate, derive_seed  # noqa: E402
from nimble_worker.task import Task  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master", required=True, help="host:port of rank 0's store")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", default=None, help="rank 0 saves the final state_dict here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://{a.master}", rank=a.rank, world_size=a.world)
    task = Task(os.path.abspath(a.task), {})
    train_ds = task.build_dataset("train")
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    model = task.build_model()
    model.train()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr)
    sampler = GlobalSampler(len(train_ds), a.batch_size, a.seed)
    shares = [a.batch_size // a.world] * a.world
    loss = torch.zeros(())
    for t in range(a.steps):
        idx = sampler.indices(t, shares, a.rank)
        torch.manual_seed(derive_seed("step", a.seed, t, a.rank))
        opt.zero_grad(set_to_none=True)
        loss = task.compute_loss(ddp, collate(train_ds, idx))
        loss.backward()
        opt.step()
    if a.save and a.rank == 0:
        torch.save(model.state_dict(), a.save)
    dist.barrier()
    print(f"rank {a.rank}: loss {float(loss):.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
