#!/usr/bin/env python3
"""Reference curve from torch DDP (+ torch's own powerSGD_hook) for a Nimble task.

Runs N processes (torch.multiprocessing.spawn, gloo over 127.0.0.1, 1 thread each) with
Nimble's model init (torch.manual_seed(seed) before build_model), Nimble's data order
(nimble_worker.data.GlobalSampler, equal shares: rank r takes Nimble's slice r of step t),
Nimble's per-step seed, and the same optimizer (constant lr). With compression it registers
`powerSGD_hook` with PowerSGDState(matrix_approximation_rank=rank,
start_powerSGD_iter=start_step, min_compression_rate=2, use_error_feedback=True,
warm_start=True, random_seed=seed). Writes {"losses": [mean training loss over all
workers, per step], ...} to --out.

--compare also runs Nimble's own Trainer in this process (world_size N over the in-process
FakeGroup, the same settings) and prints max / mean |loss difference| per step.

  python scripts/ddp_oracle.py --task examples/mnist/task.py --steps 200 --batch-size 64 \\
      --workers 2 --lr 0.001 --optimizer adam --rank 4 --start-step 10 --out curve.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python-runtime"))
os.environ.setdefault("NIMBLE_HOME", ROOT)

from nimble_worker.config import JobConfig  # noqa: E402
from nimble_worker.data import GlobalSampler, collate, derive_seed  # noqa: E402
from nimble_worker.task import Task  # noqa: E402
from nimble_worker.optim import build_optimizer  # noqa: E402


def job_config(a) -> JobConfig:
    comp = {"method": "none"} if a.no_compression else {
        "method": "powersgd", "rank": a.rank, "start_step": a.start_step,
        "min_compression_rate": 2.0, "error_feedback": True, "warm_start": True, "seed": a.seed}
    return JobConfig.from_dict({
        "task": a.task, "task_args": json.loads(a.task_args), "steps": a.steps,
        "batch_size": a.batch_size, "seed": a.seed,
        "optimizer": {"name": a.optimizer, "lr": a.lr, "momentum": a.momentum},
        "lr_schedule": {"name": "constant"}, "compression": comp})


def shares_of(a) -> list[int]:
    if a.batch_size % a.workers:
        raise SystemExit("--batch-size must be a multiple of --workers (equal shares)")
    return [a.batch_size // a.workers] * a.workers


def ddp_worker(rank: int, a, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=a.workers)
    cfg = job_config(a)
    task = Task(a.task, cfg.task_args)
    train_ds = task.build_dataset("train")
    task.build_dataset("val")  # as Nimble's Trainer does, before seeding
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = task.build_model()
    model.train()
    ddp = DDP(model, bucket_cap_mb=1024)  # one bucket (the first one is 1 MiB anyway)
    if not a.no_compression:
        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=a.rank,
                                   start_powerSGD_iter=a.start_step, min_compression_rate=2,
                                   use_error_feedback=True, warm_start=True,
                                   random_seed=a.seed)
        ddp.register_comm_hook(state, psgd.powerSGD_hook)
    opt = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    sampler = GlobalSampler(len(train_ds), cfg.batch_size, cfg.seed)
    shares = shares_of(a)
    losses = []
    t0 = time.perf_counter()
    for t in range(a.steps):
        idx = sampler.indices(t, shares, rank)
        torch.manual_seed(derive_seed("step", cfg.seed, t, rank))
        opt.zero_grad(set_to_none=True)
        loss = task.compute_loss(ddp, collate(train_ds, idx))
        loss.backward()  # DDP averages the local mean gradients: equal shares, same mean
        opt.step()
        lt = loss.detach().clone()
        dist.all_reduce(lt)
        losses.append(float(lt) / a.workers)
    if rank == 0:
        out = {"losses": losses, "source": "torch-ddp", "workers": a.workers,
               "compression": "none" if a.no_compression else "powersgd",
               "rank": a.rank, "start_step": a.start_step, "seconds": time.perf_counter() - t0}
        with open(a.out, "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def run_ddp(a) -> list[float]:
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(a, port), nprocs=a.workers, join=True)
    with open(a.out) as f:
        return json.load(f)["losses"]


def run_nimble(a) -> list[float]:
    """Nimble's Trainer, world_size N, over the in-process FakeGroup (threads)."""
    from nimble_worker.compress.fake import FakeGroup
    from nimble_worker.train import Trainer
    torch.set_num_threads(1)
    cfg = job_config(a)
    group = FakeGroup(a.workers, timeout=600)
    trainers = [Trainer(cfg, Task(a.task, cfg.task_args), r, a.workers, "cpu", group.member(r))
                for r in range(a.workers)]
    shares = shares_of(a)
    if a.match_torch_q and not a.no_compression:
        # Diagnostic: give Nimble torch's first Q's (numpy RandomState(seed) -> torch seed,
        # drawn in DDP's rebuilt bucket order: reverse parameter order for a plain
        # feed-forward model). Nimble orthogonalises a warm Q before use, as torch does.
        import numpy as np
        s = int(np.random.RandomState(a.seed).randint(1_000_000_000))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            comp = trainers[0].compressor
            first = {name: torch.randn(m, r) for name, (n, m, r) in
                     reversed(list(comp.mats.items()))}
        for tr in trainers:
            tr.compressor.q = {k: v.clone() for k, v in first.items()}

    def go(r):
        tr = trainers[r]
        tr.sync()
        return [tr.step(t, shares) for t in range(a.steps)]
    reports = group.run(go)
    return [sum(reports[r][t]["loss"] * shares[r] for r in range(a.workers)) / a.batch_size
            for t in range(a.steps)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--task-args", default="{}", help="task_args as JSON")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="adam")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--start-step", type=int, default=10)
    p.add_argument("--no-compression", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="curve.json")
    p.add_argument("--match-torch-q", action="store_true",
                   help="with --compare: start Nimble from torch's initial random Q's")
    p.add_argument("--compare", action="store_true",
                   help="also run Nimble's Trainer in-process and print the loss differences")
    a = p.parse_args()
    a.task = os.path.abspath(a.task)
    ddp = run_ddp(a)
    print(f"ddp: first {ddp[0]:.4f} last {ddp[-1]:.4f} -> {a.out}")
    if a.compare:
        nim = run_nimble(a)
        d = [abs(x - y) for x, y in zip(ddp, nim)]
        res = {"max_abs_diff": max(d), "mean_abs_diff": sum(d) / len(d),
               "ddp_last": ddp[-1], "nimble_last": nim[-1],
               "max_abs_diff_first_start_steps": max(d[:a.start_step] or [0.0])}
        print(json.dumps(res))
        with open(a.out) as f:
            out = json.load(f)
        out.update({"nimble_losses": nim, **res})
        with open(a.out, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
