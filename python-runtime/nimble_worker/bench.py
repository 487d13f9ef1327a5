"""`python -m nimble_worker.bench [--task TASK --config JSON] [--device DEV] [--quick]`.

Measures this host for `nimble bench` and the scheduler: progress lines on stderr, one
JSON object on stdout (docs/protocol.md, "Worker link", host benchmark):

    {"devices": [...as probe...], "device": "cpu",
     "matmul_gflops": {"fp32": x, "bf16": y | null, "fp16": z | null},
     "memory_gbps": device copy bandwidth (read + write bytes / s),
     "h2d_gbps": host-to-device bandwidth (null on CPU),
     "task": {"samples_per_s": {"1": .., "4": .., ...}, "max_micro_batch": n,
              "best_micro_batch": n}}        # only with --task
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any, Callable

import torch

from .config import JobConfig
from .data import collate
from .probe import probe
from .task import Task, TaskError
from .tensors import to_device

CPU_MAX_MICRO_BATCH = 4096
CUDA_MAX_MICRO_BATCH = 1 << 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda:0"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def repeat(fn: Callable[[], Any], device: torch.device, target: float) -> tuple[int, float]:
    """Runs fn until `target` seconds have passed (at least once): (runs, seconds)."""
    runs = 0
    sync(device)
    t0 = time.perf_counter()
    while True:
        fn()
        runs += 1
        if runs % 4 == 0 or runs == 1:
            sync(device)
            if time.perf_counter() - t0 >= target:
                break
    sync(device)
    return runs, time.perf_counter() - t0


# ---- hardware -----------------------------------------------------------------------
def matmul_gflops(dtype: torch.dtype, device: torch.device, target: float) -> float | None:
    """Square matmuls, the size doubled until one takes ~target/8; None where the dtype
    is unsupported or too slow (one 128 x 128 product longer than `target`)."""
    max_n = 4096 if device.type == "cpu" else 16384
    n = 128
    try:
        while True:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            timed(lambda: a @ b, device)  # warm-up
            dt = min(timed(lambda: a @ b, device) for _ in range(3))
            if n == 128 and dt > target:
                return None
            if dt >= target / 8 or n >= max_n:
                break
            n *= 2
        runs, secs = repeat(lambda: a @ b, device, target)
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return 2.0 * n ** 3 * runs / secs / 1e9


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    from .probe import total_ram
    return total_ram() // 2


def memory_gbps(device: torch.device, target: float, quick: bool) -> float:
    nbytes = 32 << 20 if quick else 256 << 20
    if device.type == "cpu":
        nbytes = max(1 << 20, min(nbytes, available_ram() // 16))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    runs, secs = repeat(lambda: dst.copy_(src), device, target)
    return 2.0 * nbytes * runs / secs / 1e9


def h2d_gbps(device: torch.device, target: float, quick: bool) -> float | None:
    if device.type == "cpu":
        return None
    nbytes = 32 << 20 if quick else 256 << 20
    host = torch.empty(nbytes // 4, dtype=torch.float32)
    if device.type == "cuda":
        host = host.pin_memory()
    host.fill_(1.0)
    dev = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dev.copy_(host)
    runs, secs = repeat(lambda: dev.copy_(host, non_blocking=True), device, target)
    return nbytes * runs / secs / 1e9


# ---- the task -----------------------------------------------------------------------
class _Peak:
    """Peak RSS growth of the process during a block (Linux: VmHWM reset through
    /proc/self/clear_refs; elsewhere the growth of ru_maxrss, an upper-biased bound)."""

    def __init__(self):
        self.clear = self._try_clear()

    @staticmethod
    def _try_clear() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _status_kb("VmHWM") is not None
        except OSError:
            return False

    def measure(self, fn: Callable[[], Any]) -> int:
        if self.clear:
            before = _status_kb("VmRSS") or 0
            self._try_clear()
            fn()
            return max(0, ((_status_kb("VmHWM") or 0) - before) * 1024)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = _status_kb("VmRSS")
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        base = rss * 1024 if rss is not None else before * scale
        return max(0, after * scale - base)


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class TaskBench:
    def __init__(self, task: Task, device: torch.device):
        self.task, self.device = task, device
        self.ds = task.build_dataset("train")
        self.n = len(self.ds)
        if self.n <= 0:
            raise TaskError("the training dataset is empty", task.where("build_dataset"))
        self.model = task.build_model().to(device)
        self.model.train()
        self.cursor = 0

    def step(self, size: int) -> None:
        """Forward + backward (no optimizer) over `size` consecutive training items."""
        idx = [(self.cursor + i) % self.n for i in range(size)]
        self.cursor = (self.cursor + size) % self.n
        self.model.zero_grad(set_to_none=True)
        batch = to_device(collate(self.ds, idx, self.task.collate), self.device)
        self.task.compute_loss(self.model, batch).backward()
        self.model.zero_grad(set_to_none=True)

    def fits(self, size: int) -> bool:
        try:
            self.step(size)
            sync(self.device)
            return True
        except torch.cuda.OutOfMemoryError:
            self.model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return False

    def max_micro_batch(self) -> int:
        if self.device.type == "cpu":
            return self._max_cpu()
        ok, bad = 0, None
        size = 1
        while size <= CUDA_MAX_MICRO_BATCH:
            if not self.fits(size):
                bad = size
                break
            ok, size = size, size * 2
        if ok == 0:
            raise TaskError("one sample does not fit in device memory",
                            self.task.where("compute_loss"))
        if bad is None:
            return ok
        while bad - ok > max(1, ok // 8):  # back off: bisect between the last fit and OOM
            mid = (ok + bad) // 2
            ok, bad = (mid, bad) if self.fits(mid) else (ok, mid)
        return ok

    def _max_cpu(self) -> int:
        limit = available_ram() // 4
        peak = _Peak()
        ok, size = 1, 1
        while size <= CPU_MAX_MICRO_BATCH:
            need = peak.measure(lambda: self.step(size))
            log(f"task micro-batch {size}: step peak +{need / 2**20:.1f} MiB "
                f"(limit {limit / 2**20:.0f} MiB)")
            if need > limit:  # so the next size, about twice this one, stays under ~50%
                break
            ok, size = size, size * 2
        return ok

    def samples_per_s(self, size: int, target: float) -> float:
        self.step(size)  # warm-up
        runs, secs = repeat(lambda: self.step(size), self.device, target)
        return size * runs / secs


def bench_task(task: Task, device: torch.device, target: float) -> dict:
    tb = TaskBench(task, device)
    log("task max micro-batch ...")
    max_mb = tb.max_micro_batch()
    log(f"task max micro-batch {max_mb}")
    sizes, s = [], 1
    while s <= max_mb:
        sizes.append(s)
        s *= 4
    if sizes[-1] != max_mb:
        sizes.append(max_mb)
    rates: dict[str, float] = {}
    for size in sizes:
        log(f"task samples/s at micro-batch {size} ...")
        rates[str(size)] = tb.samples_per_s(size, target)
        log(f"task samples/s at micro-batch {size}: {rates[str(size)]:.1f}")
    best = max(sizes, key=lambda k: rates[str(k)])
    return {"samples_per_s": rates, "max_micro_batch": max_mb, "best_micro_batch": best}


def bench(device_name: str, quick: bool = False, task: Task | None = None) -> dict:
    device = torch.device(device_name)
    target = 0.05 if quick else 0.3
    out: dict[str, Any] = {"devices": probe()["devices"], "device": device_name}
    gflops: dict[str, float | None] = {}
    for name, dtype in DTYPES.items():
        log(f"matmul {name} ...")
        gflops[name] = matmul_gflops(dtype, device, target)
        log(f"matmul {name}: " + ("unsupported or too slow" if gflops[name] is None
                                  else f"{gflops[name]:.1f} GFLOP/s"))
    out["matmul_gflops"] = gflops
    log("memory copy ...")
    out["memory_gbps"] = memory_gbps(device, target, quick)
    log(f"memory copy: {out['memory_gbps']:.1f} GB/s")
    log("host to device ...")
    out["h2d_gbps"] = h2d_gbps(device, target, quick)
    log("host to device: " + ("n/a" if out["h2d_gbps"] is None else f"{out['h2d_gbps']:.1f} GB/s"))
    if task is not None:
        out["task"] = bench_task(task, device, target)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nimble_worker.bench")
    ap.add_argument("--task", help="the task file (build_model, build_dataset, ...)")
    ap.add_argument("--config", default="{}",
                    help="the job config as JSON (task_args are used), or a JSON file")
    ap.add_argument("--device", default=None, help="cpu, cuda:0, mps (default: the first)")
    ap.add_argument("--quick", action="store_true", help="short measurements (tests)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads")
    ap.add_argument("--package", default=None, help="the task's folder, for a task package")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    text = args.config
    if not text.lstrip().startswith("{") and os.path.isfile(text):
        with open(text) as f:
            text = f.read()
    cfg = JobConfig.from_dict(json.loads(text))
    try:
        task = Task(args.task, cfg.task_args, args.package) if args.task else None
        result = bench(args.device or default_device(), args.quick, task)
    except TaskError as e:
        log(f"nimble_worker.bench: task error at {e.where}: {e.message}")
        return 3
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
