"""Single-process run of a task, no provider: `python -m nimble_worker.local TASK CONFIG_JSON`.

For measuring a task quickly (world_size 1, the all-reduce is the identity). CONFIG_JSON
is the job config as JSON (the YAML's content), e.g. '{"steps": 300, "batch_size": 64}'.
"""

from __future__ import annotations

import json
import sys
import time

from .config import JobConfig
from .task import Task
from .train import Trainer


def run(task_path: str, config: dict, log=print) -> dict:
    cfg = JobConfig.from_dict(config)
    t0 = time.perf_counter()
    tr = Trainer(cfg, Task(task_path, cfg.task_args), 0, 1, "cpu", lambda b: b.clone())
    log(json.dumps({"ready": tr.describe(), "setup_s": round(time.perf_counter() - t0, 2)}))
    t0 = time.perf_counter()
    _, sums, counts = tr.eval(0, cfg.eval.samples, cfg.eval.batch_size)
    log(json.dumps({"step": 0, **{k: round(v / max(counts[k], 1e-12), 4) for k, v in sums.items()}}))
    t0 = time.perf_counter()
    result: dict = {}
    for t in range(cfg.steps):
        r = tr.step(t, [cfg.batch_size])
        done = t + 1
        if (cfg.eval.every and done % cfg.eval.every == 0) or done == cfg.steps:
            _, sums, counts = tr.eval(0, cfg.eval.samples, cfg.eval.batch_size)
            result = {"step": done, "train_loss": round(r["loss"], 4),
                      **{k: round(v / max(counts[k], 1e-12), 4) for k, v in sums.items()},
                      "elapsed_s": round(time.perf_counter() - t0, 1)}
            log(json.dumps(result))
    return result


if __name__ == "__main__":
    run(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
