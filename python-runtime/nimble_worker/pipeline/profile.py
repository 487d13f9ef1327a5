"""`python -m nimble_worker.pipeline.profile`: what each layer of the task's model costs,
for the coordinator to choose the pipeline's stage bounds. The model is built on the meta
device and its layers are materialised one at a time (pipeline/split.py, profile_layers),
so a model larger than this host's memory can be profiled.

Prints one JSON line: {"ok": true, "sequential", "model", "micro_batch", "base_rss_bytes"
(resident bytes of this process once torch is imported and the datasets built, before any
layer), "layers": [{"name", "type", "params", "param_bytes", "activation_bytes",
"saved_bytes", "forward_backward_s"}]}; or {"ok": false, "kind": "task" | "config",
"message", "where" | "field"} (exit code 3 for a task error, 2 for a config error).
micro_batch = ceil(batch_size / replicas / micro_batches).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from ..config import ConfigError, JobConfig
from ..task import Task, TaskError
from .split import UnsplittableModel, _too_many, meta_model, profile_layers


def resident_bytes() -> int:
    """This process's resident set size now (Linux: /proc; elsewhere its peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def micro_batch_of(cfg: JobConfig, replicas: int) -> int:
    m = cfg.parallel.micro_batches if cfg.parallel is not None else 1
    return max(1, math.ceil(cfg.batch_size / max(1, replicas) / m))


def run(task: Task, cfg: JobConfig, replicas: int = 1, device: str = "cpu") -> dict:
    train = task.build_dataset("train")
    task.build_dataset("val")
    # The runtime's one-time costs (thread pools, allocator caches: about 35 MB here) come
    # with the first operations a worker runs: count them in its base.
    warm = torch.nn.Linear(512, 512)
    warm(torch.randn(64, 512)).sum().backward()
    del warm
    base = resident_bytes()
    model = meta_model(task)
    n = sum(p.numel() for p in model.parameters())
    stages = cfg.parallel.pipeline_stages if cfg.parallel is not None else 1
    import torch.nn as nn
    if isinstance(model, nn.Sequential) and stages > len(model):
        raise _too_many(task, stages, len(model))
    micro = micro_batch_of(cfg, replicas)
    layers = profile_layers(task, cfg, micro, device, train_ds=train)
    import torch.nn as nn
    return {"ok": True, "sequential": isinstance(model, nn.Sequential),
            "model": f"{type(model).__name__} ({n:,} parameters)", "micro_batch": micro,
            "base_rss_bytes": base, "layers": layers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nimble_worker.pipeline.profile")
    ap.add_argument("--task", required=True)
    ap.add_argument("--config", required=True, help="the validated job config, as JSON")
    ap.add_argument("--package-dir", default=None, help="the task's folder, for a task package")
    ap.add_argument("--site-dir", action="append", default=[], help="installed requirements")
    ap.add_argument("--replicas", type=int, default=1, help="D: replicas of each stage")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    try:
        cfg = JobConfig.from_dict(json.loads(a.config))
        out = run(Task(a.task, cfg.task_args, a.package_dir, a.site_dir), cfg, a.replicas, a.device)
    except ConfigError as e:
        print(json.dumps({"ok": False, "kind": "config", "field": e.field, "message": e.message}))
        return 2
    except UnsplittableModel as e:  # the task is fine; the config's stages do not fit it
        print(json.dumps({"ok": False, "kind": "config", "field": "parallel.pipeline_stages",
                          "message": f"{e.where}: {e.message}"}))
        return 2
    except TaskError as e:
        print(json.dumps({"ok": False, "kind": "task", "where": e.where, "message": e.message}))
        return 3
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
