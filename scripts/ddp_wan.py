#!/usr/bin/env python3
"""One rank of the torch DDP (gloo) reference for `npm run bench:wan`.

The WAN harness starts one of these per network namespace, so that each rank's traffic
leaves through its own shaped link, as Nimble's providers' does. The run matches Nimble's
(see ddp_oracle.py): Nimble's model init, data order (equal shares), per-step seed and
optimizer; with --compression powersgd it registers torch's own `powerSGD_hook`.

Latency: the kernel's netem qdisc is missing on the machines this was written for, and gloo
has no hook to delay its frames, so --latency-ms is *modelled*: every all-reduce completes
2(N-1) one-way latencies later than it did (a ring all-reduce's sequential hops), added
after the transfer. That is not what a delayed link does to gloo exactly: a ring that
pipelines its chunks (Nimble's does, gloo's partly) hides part of the delays behind long
transfers, so this can overstate DDP's cost at 100 Mbit/s and below, and it ignores TCP
windows, which a real delayed link would strain. DDP figures at RTT > 0 are modelled.

Writes one JSON line per step to --out: loss (this rank's), step_s, compute_s (the step
less the communication left exposed after the last gradient was ready), comm_s (seconds
inside all-reduces), allreduce_bytes (bytes this rank's ring all-reduces send: 2(N-1)/N
of each all-reduced tensor), and on evaluation steps (rank 0) val_loss, plus eval_s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python-runtime"))
os.environ.setdefault("NIMBLE_HOME", ROOT)

from nimble_worker.config import JobConfig  # noqa: E402
from nimble_worker.data import GlobalSampler, collate, derive_seed  # noqa: E402
from nimble_worker.task import Task  # noqa: E402
from nimble_worker.optim import build_optimizer  # noqa: E402


class CommClock:
    """Times every all-reduce (call to completion) and adds the modelled latency."""

    def __init__(self, world: int, latency_s: float):
        self.world = world
        self.delay_s = 2 * (world - 1) * latency_s
        self.comm_s = 0.0
        self.bytes = 0
        self.last_call = 0.0
        self._all_reduce = dist.all_reduce

    def install(self) -> None:
        clock = self

        class TimedWork:
            def __init__(self, work, started: float):
                self.work, self.started = work, started

            def get_future(self):
                def done(fut):
                    if clock.delay_s > 0:
                        time.sleep(clock.delay_s)
                    clock.comm_s += time.perf_counter() - self.started
                    return fut.value()
                return self.work.get_future().then(done)

            def wait(self, *a, **k):
                ok = self.work.wait(*a, **k)
                if clock.delay_s > 0:
                    time.sleep(clock.delay_s)
                clock.comm_s += time.perf_counter() - self.started
                return ok

        def all_reduce(tensor, *args, **kwargs):
            started = time.perf_counter()
            clock.bytes += int(2 * (clock.world - 1) / clock.world * tensor.numel() * tensor.element_size())
            work = clock._all_reduce(tensor, *args, **kwargs)
            if work is None:  # synchronous call
                if clock.delay_s > 0:
                    time.sleep(clock.delay_s)
                clock.comm_s += time.perf_counter() - started
                return None
            return TimedWork(work, started)

        # DDP's default hook and powerSGD_hook both call torch.distributed.all_reduce.
        dist.all_reduce = all_reduce

    def timed(self, hook):
        """A comm hook that notes when a bucket's gradients were ready, then runs `hook`."""
        def timed_hook(state, bucket):
            self.last_call = time.perf_counter()
            return hook(state, bucket)
        return timed_hook

    def take(self) -> tuple[float, int]:
        out = (self.comm_s, self.bytes)
        self.comm_s, self.bytes = 0.0, 0
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--task-args", default="{}", help="task_args as JSON")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master", required=True, help="host:port of rank 0's store")
    p.add_argument("--ifname", default=None, help="network interface gloo uses (GLOO_SOCKET_IFNAME)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="adam")
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--compression", choices=["none", "powersgd"], default="none")
    p.add_argument("--psgd-rank", type=int, default=4)
    p.add_argument("--start-step", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=0.0, help="modelled one-way latency (see above)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--eval-batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.batch_size % a.world:
        raise SystemExit(f"--batch-size {a.batch_size} must be a multiple of --world {a.world} (equal shares)")
    if a.ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = a.ifname
    torch.set_num_threads(a.threads)

    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    comp = {"method": "none"} if a.compression == "none" else {
        "method": "powersgd", "rank": a.psgd_rank, "start_step": a.start_step,
        "min_compression_rate": 2.0, "error_feedback": True, "warm_start": True, "seed": a.seed}
    cfg = JobConfig.from_dict({
        "task": os.path.abspath(a.task), "task_args": json.loads(a.task_args), "steps": a.steps,
        "batch_size": a.batch_size, "seed": a.seed,
        "optimizer": {"name": a.optimizer, "lr": a.lr, "weight_decay": a.weight_decay},
        "lr_schedule": {"name": "constant"}, "compression": comp})
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}", rank=a.rank, world_size=a.world)
    clock = CommClock(a.world, a.latency_ms / 1000)
    clock.install()

    task = Task(cfg.task, cfg.task_args)
    train_ds = task.build_dataset("train")
    val_ds = task.build_dataset("val")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = task.build_model()
    model.train()
    ddp = DDP(model, bucket_cap_mb=1024)
    if a.compression == "powersgd":
        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=a.psgd_rank,
                                   start_powerSGD_iter=a.start_step, min_compression_rate=2,
                                   use_error_feedback=True, warm_start=True, random_seed=a.seed)
        ddp.register_comm_hook(state, clock.timed(psgd.powerSGD_hook))
    else:
        ddp.register_comm_hook(None, clock.timed(default_hooks.allreduce_hook))  # DDP's default
    opt = build_optimizer(cfg, [q for q in model.parameters() if q.requires_grad])
    sampler = GlobalSampler(len(train_ds), cfg.batch_size, cfg.seed)
    shares = [a.batch_size // a.world] * a.world
    dist.barrier()
    clock.take()
    with open(a.out, "w") as out:
        for t in range(a.steps):
            t0 = time.perf_counter()
            idx = sampler.indices(t, shares, a.rank)
            torch.manual_seed(derive_seed("step", cfg.seed, t, a.rank))
            opt.zero_grad(set_to_none=True)
            loss = task.compute_loss(ddp, collate(train_ds, idx))
            loss.backward()  # returns once DDP's all-reduces are done
            t_reduced = time.perf_counter()
            opt.step()
            t1 = time.perf_counter()
            comm_s, sent = clock.take()
            exposed = max(0.0, t_reduced - max(clock.last_call, t0))
            rec = {"step": t, "loss": float(loss.detach()), "step_s": t1 - t0,
                   "compute_s": (t1 - t0) - exposed, "comm_s": comm_s, "allreduce_bytes": sent}
            if a.eval_every > 0 and ((t + 1) % a.eval_every == 0 or t == a.steps - 1):
                e0 = time.perf_counter()
                if a.rank == 0:
                    end = min(a.eval_samples, len(val_ds))
                    total, model_ = 0.0, ddp.module
                    model_.eval()
                    with torch.no_grad():
                        for b in range(0, end, a.eval_batch_size):
                            ids = range(b, min(b + a.eval_batch_size, end))
                            total += task.evaluate(model_, collate(val_ds, ids))["loss"] * len(ids)
                    model_.train()
                    rec["val_loss"] = total / max(1, end)
                dist.barrier()
                clock.take()
                rec["eval_s"] = time.perf_counter() - e0
            out.write(json.dumps(rec) + "\n")
            out.flush()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
