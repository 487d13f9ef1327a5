"""`nimble train --dry-run`: load the task, build its datasets and model and the config's
optimizer, and run one step's forward and backward on one local worker, without any
network. Prints one JSON line: what was built and the loss, or the task's error with
`kind` and `where` (exit code 3 for a task error, 2 for a config error)."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, JobConfig
from .task import Task, TaskError
from .train import Trainer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nimble_worker.dryrun")
    ap.add_argument("--task", required=True)
    ap.add_argument("--config", required=True, help="the validated job config, as JSON")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--package", default=None, help="the task's folder, for a task package")
    ap.add_argument("--site-dir", action="append", default=[], help="installed requirements")
    a = ap.parse_args(argv)
    try:
        cfg = JobConfig.from_dict(json.loads(a.config))
        tr = Trainer(cfg, Task(a.task, cfg.task_args, a.package, a.site_dir), 0, 1, a.device, lambda b: b.clone())
        report = tr.step(0, [cfg.batch_size])
    except ConfigError as e:
        print(json.dumps({"ok": False, "kind": "config", "field": e.field, "message": e.message}))
        return 2
    except TaskError as e:
        print(json.dumps({"ok": False, "kind": "task", "where": e.where, "message": e.message}))
        return 3
    print(json.dumps({"ok": True, **tr.replica.describe(), "loss": report["loss"],
                      "batch_size": cfg.batch_size, "micro_batches": report["micro_batches"],
                      "device": a.device, "skipped": report["skipped"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
