"""Prefetch (config `prefetch`): batches of the steps ahead loaded on a background thread
give the same training as loading each batch when needed, whatever happens between steps."""

import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, TINY_CONFIG
from nimble_worker.config import JobConfig
from nimble_worker.task import Task, TaskError
from nimble_worker.train import Trainer

# Items that cost a little to make: noise from nimble's per-item generator (augmentation),
# and a model with dropout (drawing from the global generator, seeded per step).
AUGMENTED_TASK = '''
import torch, torch.nn as nn, torch.nn.functional as F
from nimble_worker.data import item_generator
class Noisy(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)
    def __len__(self): return len(self.x)
    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(4, generator=item_generator()), self.y[i]
def build_dataset(split, args): return Noisy(40 if split == "train" else 12)
def build_model(args): return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 2))
'''

# Item i is the number i and the loss the batch's mean item, so a step's loss names its items.
INDEX_TASK = '''
import torch, torch.nn as nn
BAD = None  # an index whose item fails
LIMIT = None  # the largest micro-batch the "device" holds
class Numbers(torch.utils.data.Dataset):
    def __len__(self): return 30
    def __getitem__(self, i):
        if i == BAD:
            raise ValueError(f"corrupt record {i}")
        return torch.tensor([float(i)])
def build_dataset(split, args): return Numbers()
def build_model(args):
    m = nn.Linear(1, 1, bias=False)
    nn.init.ones_(m.weight)
    return m
def compute_loss(model, batch):
    if LIMIT is not None and len(batch) > LIMIT:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return model(batch).mean()
'''


def write(tmp_path, text):
    path = tmp_path / "task.py"
    path.write_text(text)
    return str(path)


def trainer(task_path, prefetch, rank=0, world=1, allreduce=lambda b: b.clone(), **over):
    cfg = JobConfig.from_dict({**TINY_CONFIG, "compression": {"method": "none"}, "steps": 30,
                               "batch_size": 8, "prefetch": prefetch, **over})
    return Trainer(cfg, Task(task_path, cfg.task_args), rank, world, "cpu", allreduce)


def run(task_path, prefetch, shares_per_step, rank):
    """Steps of rank `rank` of 2 (its all-reduce returns its own gradient: ranks in threads
    would share the global generator that dropout draws from): its losses and final hash."""
    tr = trainer(task_path, prefetch, rank, 2)
    out = []
    for t, shares in enumerate(shares_per_step):
        out.append(tr.step(t, shares)["loss"])
        if t == 3:  # an evaluation between steps, with batches in flight
            out.append(tr.eval(0, 12, 5))
    return out + [tr.hash()], tr


def test_training_is_bit_identical_with_prefetch_on_and_off(tmp_path):
    task = write(tmp_path, AUGMENTED_TASK)
    shares = [[4, 4]] * 4 + [[1, 7]] * 4 + [[8, 0]] * 2  # rebalanced twice
    for rank in (0, 1):
        off, _ = run(task, 0, shares, rank)
        on, tr = run(task, 2, shares, rank)
        assert on == off
        assert tr.replica.prefetch.hits == 7  # every step but 0, 4 and 8
    deadline = time.monotonic() + 5
    while any(t.name == "nimble-prefetch" for t in threading.enumerate()):  # they end once idle (IDLE_S)
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_augmentation_from_the_item_generator_does_not_depend_on_the_split(tmp_path):
    task = write(tmp_path, AUGMENTED_TASK.replace("nn.Dropout(0.3)", "nn.Identity()"))
    one = trainer(task, 2)
    two = [trainer(task, 2, rank=r, world=2) for r in range(2)]
    for t in range(4):  # 40 items, batch 8: step 5 would start epoch 1
        loss, _ = one.replica.grads(t, [8])
        parts = [tr.replica.grads(t, [3, 5]) for tr in two]
        assert loss == pytest.approx((3 * parts[0][0] + 5 * parts[1][0]) / 8, abs=1e-6)


def test_a_change_of_shares_loads_the_new_items(tmp_path):
    tr = trainer(write(tmp_path, INDEX_TASK), 2, rank=1, world=3)
    replica = tr.replica
    # Step 2 keeps rank 1's share but not its place in the batch; step 2 comes again.
    steps = [(0, [2, 3, 3]), (1, [2, 3, 3]), (2, [3, 3, 2]), (3, [3, 3, 2]), (4, [1, 6, 1]),
             (2, [1, 6, 1]), (9, [2, 4, 2])]
    for t, shares in steps:
        loss, _ = replica.grads(t, shares)
        items = replica.sampler.indices(t, shares, 1)
        assert loss == pytest.approx(sum(items) / len(items)), (t, shares)
    assert (replica.prefetch.hits, replica.prefetch.misses) == (2, 5)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_an_item_that_fails_is_a_task_error_naming_it(tmp_path, prefetch):
    tr = trainer(write(tmp_path, INDEX_TASK), prefetch)
    bad = next(i for i in tr.replica.sampler.indices(2, [8], 0)
               if i not in tr.replica.sampler.indices(0, [8], 0) + tr.replica.sampler.indices(1, [8], 0))
    tr.replica.task.module.BAD = bad
    tr.step(0, [8])
    tr.step(1, [8])
    with pytest.raises(TaskError, match=f"corrupt record {bad}") as err:
        tr.step(2, [8])  # with prefetch: loaded in the background while step 1 ran
    assert err.value.where == f"task.py: build_dataset('train')[{bad}]"
    assert prefetch == 0 or tr.replica.prefetch.hits == 2


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_collate_that_fails_is_a_task_error_naming_it(tmp_path, prefetch):
    path = write(tmp_path, INDEX_TASK + '''
CALLS = 0
def collate(items):
    global CALLS
    CALLS += 1
    if CALLS == 3:
        raise KeyError("no field 'label'")
    return torch.stack(items)
''')
    tr = trainer(path, prefetch)
    tr.step(0, [8])
    tr.step(1, [8])
    with pytest.raises(TaskError, match="no field 'label'") as err:
        tr.step(2, [8])
    assert err.value.where == "task.py: collate"


def test_default_collate_failing_names_it(tmp_path):
    tr = trainer(write(tmp_path, INDEX_TASK.replace("torch.tensor([float(i)])", "torch.zeros(i % 3)")), 2)
    with pytest.raises(TaskError) as err:
        tr.step(0, [8])
    assert err.value.where == "task.py: collate (torch's default_collate: the task defines none)"


def test_running_out_of_memory_on_a_prefetched_step_redoes_it_in_smaller_micro_batches(tmp_path):
    path = write(tmp_path, INDEX_TASK)
    runs = []
    for prefetch in (0, 2):
        tr = trainer(path, prefetch, batch_size=24, optimizer={"name": "sgd", "lr": 0.01})
        losses = [tr.step(t, [24])["loss"] for t in range(2)]
        tr.replica.task.module.LIMIT = 7  # less device memory from step 2 on
        reports = [tr.step(t, [24]) for t in range(2, 5)]
        runs.append((losses + [r["loss"] for r in reports], tr.hash(), tr.replica.memory_caps,
                     [r["micro_batches"] for r in reports]))
        if prefetch:
            assert tr.replica.prefetch.hits == 4  # steps 1, 2 (then redone), 3 and 4
    assert runs[0] == runs[1]
    assert runs[1][2] == [(2, 12), (2, 6)] and runs[1][3] == [4, 4, 4]


def test_a_dataset_drawing_from_the_global_generator_turns_prefetch_off(tmp_path, capfd):
    task = write(tmp_path, AUGMENTED_TASK.replace("generator=item_generator()", ""))
    tr = trainer(task, 2)
    tr.step(0, [8])
    assert tr.replica.prefetch is None
    assert "prefetch is off" in capfd.readouterr().err
    off = trainer(task, 0)
    off.step(0, [8])
    assert [tr.step(t, [8])["loss"] for t in (1, 2)] == [off.step(t, [8])["loss"] for t in (1, 2)]


def test_the_process_exits_cleanly_while_batches_are_loading(tmp_path):
    # Torch aborts a process whose interpreter finalizes while a thread is inside an operation.
    task = write(tmp_path, AUGMENTED_TASK.replace(
        "return self.x[i]", "torch.nn.functional.conv2d(torch.ones(1, 8, 96, 96), torch.ones(8, 8, 5, 5))\n        return self.x[i]"))
    script = f"""
import sys
sys.path[:0] = {[ROOT]!r}
from nimble_worker.config import JobConfig
from nimble_worker.task import Task
from nimble_worker.train import Trainer
cfg = JobConfig.from_dict({{"steps": 30, "batch_size": 8, "prefetch": 4, "compression": {{"method": "none"}}}})
Trainer(cfg, Task({task!r}, {{}}), 0, 1, "cpu", lambda b: b.clone()).step(0, [8])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
