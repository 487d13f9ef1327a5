"""The knobs researchers expect (issue "Real training code"): grad_clip, precision,
schedules, no_decay, the task's own optimizer and collate, the default loss's forms, and
buffers (BatchNorm statistics) agreeing on every replica."""

import json
import threading

import pytest
import torch

from conftest import TINY_CONFIG
from nimble_worker.config import JobConfig
from nimble_worker.optim import lr_factor
from nimble_worker.task import Task, TaskError
from nimble_worker.train import Trainer
from test_train import ThreadRing

BN_TASK = '''
import torch, torch.nn as nn, torch.nn.functional as F
class Points(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g) * 3 + 1
        self.y = (self.x.sum(1) > 4).long()
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]
def build_dataset(split, args): return Points(48 if split == "train" else 16, 1)
def build_model(args): return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
'''

# Variable-length dict items, collated by the task; a model that returns an object with .loss.
SEQ_TASK = '''
import torch, torch.nn as nn
from types import SimpleNamespace
class Seqs(torch.utils.data.Dataset):
    def __len__(self): return 40
    def __getitem__(self, i):
        n = 1 + i % 5
        return {"ids": torch.arange(n) % 7, "label": torch.tensor(i % 2)}
def collate(items):
    width = max(len(it["ids"]) for it in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    for r, it in enumerate(items):
        ids[r, :len(it["ids"])] = it["ids"]
    return {"input_ids": ids, "labels": torch.stack([it["label"] for it in items])}
class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 8), nn.Linear(8, 2)
    def forward(self, input_ids, labels=None):
        logits = self.head(self.emb(input_ids).mean(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)
def build_dataset(split, args): return Seqs()
def build_model(args): return Classifier()
def build_optimizer(model, args):
    return torch.optim.SGD([{"params": model.emb.parameters(), "lr": 0.5}, {"params": model.head.parameters()}], lr=0.1)
'''


def write(tmp_path, text, name="task.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def trainer(task_path, rank=0, world=1, allreduce=lambda b: b.clone(), **over):
    cfg = JobConfig.from_dict({**TINY_CONFIG, "compression": {"method": "none"}, **over})
    return Trainer(cfg, Task(task_path, cfg.task_args), rank, world, "cpu", allreduce)


def run_ranks(trs, shares_per_step, want_hash=False):
    reports = [[] for _ in trs]

    def run(r):
        reports[r].append(trs[r].sync())
        for t, shares in enumerate(shares_per_step):
            reports[r].append(trs[r].step(t, shares, want_hash=want_hash))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(trs))]
    [th.start() for th in threads]
    [th.join() for th in threads]
    return reports


def test_grad_clip_clips_the_reduced_gradient_the_same_on_1_and_3_workers(tiny_task):
    over = {"optimizer": {"name": "sgd", "lr": 0.5}, "batch_size": 12, "grad_clip": 0.05}
    shares = [[2, 3, 7], [12, 0, 0], [4, 4, 4], [1, 1, 10]]
    one = trainer(tiny_task, **over)
    unclipped = trainer(tiny_task, **{**over, "grad_clip": 0.0})
    for t in range(len(shares)):
        one.step(t, [12])
        unclipped.step(t, [12])
    ring = ThreadRing(3)
    three = [trainer(tiny_task, rank=r, world=3, allreduce=ring.member(r), **over) for r in range(3)]
    run_ranks(three, shares)
    for p, q in zip(three[0].params, one.params):
        assert torch.allclose(p, q, atol=1e-4)
    # Clipping was in force: without it the weights went elsewhere.
    assert max((p - q).abs().max().item() for p, q in zip(one.params, unclipped.params)) > 1e-2


def test_bf16_autocast_trains_on_cpu_close_to_fp32(tiny_task):
    fp32 = trainer(tiny_task)
    bf16 = trainer(tiny_task, precision="bf16")
    for t in range(5):
        a, b = fp32.step(t, [8]), bf16.step(t, [8])
        assert b["loss"] == pytest.approx(a["loss"], abs=0.05) and not b["skipped"]
    assert any((p - q).abs().max().item() > 0 for p, q in zip(fp32.params, bf16.params))


def test_fp16_loss_scale_halves_on_a_skipped_step_and_is_checkpointed(tmp_path):
    task = write(tmp_path, BN_TASK.replace("def build_model", '''
_calls = 0
def compute_loss(model, batch):
    global _calls
    _calls += 1
    x, y = batch
    loss = torch.nn.functional.cross_entropy(model(x), y)
    return loss * float("inf") if _calls == 2 else loss
def build_model'''))
    tr = trainer(task, precision="fp16", batch_size=8)
    start = tr.replica.loss_scale.value
    assert start == 2.0 ** 16
    assert not tr.step(0, [8])["skipped"]
    assert tr.step(1, [8])["skipped"]
    assert tr.replica.loss_scale.value == start / 2
    files = dict(tr.state("checkpoint"))
    resumed = trainer(task, precision="fp16", batch_size=8)
    resumed.load_state(files)
    assert resumed.replica.loss_scale.value == start / 2


def test_schedules_decay_linearly_or_by_cosine_to_min_lr_at_decay_steps():
    def f(name, **extra):
        return lr_factor(JobConfig.from_dict({"steps": 100, "optimizer": {"lr": 0.1},
                                              "lr_schedule": {"name": name, "min_lr": 0.01, **extra}}))
    lin = f("linear")
    assert lin(0) == pytest.approx(1.0) and lin(50) == pytest.approx(0.1 + 0.9 * 0.5) and lin(100) == pytest.approx(0.1)
    cos = f("cosine", decay_steps=40)
    assert cos(20) == pytest.approx(0.1 + 0.9 * 0.5) and cos(40) == pytest.approx(0.1) and cos(90) == pytest.approx(0.1)
    wl = f("warmup_linear", warmup_steps=10, decay_steps=60)
    assert wl(4) == pytest.approx(0.5) and wl(10) == pytest.approx(1.0) and wl(35) == pytest.approx(0.1 + 0.9 * 0.5)
    assert wl(60) == pytest.approx(0.1)


def test_no_decay_leaves_biases_and_norm_weights_out_of_weight_decay(tmp_path):
    tr = trainer(write(tmp_path, BN_TASK), optimizer={"name": "adamw", "weight_decay": 0.1, "no_decay": True})
    decay, rest = tr.replica.optimizer.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in rest["params"]) and rest["weight_decay"] == 0.0
    assert len(decay["params"]) + len(rest["params"]) == len(tr.replica.trainable)


def test_a_task_collates_variable_length_dict_items_builds_its_optimizer_and_returns_loss(tmp_path):
    tr = trainer(write(tmp_path, SEQ_TASK), batch_size=8)
    assert [g["initial_lr"] for g in tr.replica.optimizer.param_groups] == [0.5, 0.1]  # the schedule scales both
    losses = [tr.step(t, [8])["loss"] for t in range(6)]
    assert all(0 < loss < 5 for loss in losses) and losses[-1] < losses[0]


def test_the_default_loss_takes_the_usual_forms_and_names_what_it_got(tmp_path):
    pair = write(tmp_path, BN_TASK.replace("nn.Linear(8, 2))", "nn.Linear(8, 2))\n"
                                           "class Pair(torch.nn.Module):\n"
                                           "    def __init__(self, m): super().__init__(); self.m = m\n"
                                           "    def forward(self, x): out = self.m(x); return out, out.pow(2).mean()\n"
                                           "_b = build_model\n"
                                           "def build_model(args): return Pair(_b(args))"), "pair.py")
    assert trainer(pair, batch_size=8).step(0, [8])["loss"] > 0  # (logits, loss) from the model
    odd = write(tmp_path, BN_TASK.replace("return self.x[i], self.y[i]", "return self.x[i], self.y[i], i"), "odd.py")
    with pytest.raises(TaskError) as err:
        trainer(odd, batch_size=8).step(0, [8])
    assert err.value.where == "odd.py: compute_loss (Nimble's default: the task defines none)"
    assert "the batch is a list of 3; expected a dict batch for model(**batch)" in err.value.message


def test_batchnorm_statistics_agree_on_every_replica_and_a_diverged_buffer_is_caught(tmp_path):
    task = write(tmp_path, BN_TASK)
    ring = ThreadRing(2)
    trs = [trainer(task, rank=r, world=2, allreduce=ring.member(r), batch_size=12) for r in range(2)]
    reports = run_ranks(trs, [[5, 7], [12, 0], [3, 9]], want_hash=True)
    bn = [tr.replica.model[1] for tr in trs]
    assert torch.equal(bn[0].running_mean, bn[1].running_mean) and torch.equal(bn[0].running_var, bn[1].running_var)
    assert bn[0].num_batches_tracked.item() == bn[1].num_batches_tracked.item() > 0
    assert reports[0][-1]["hash"] == reports[1][-1]["hash"]
    # A buffer that drifts on one replica changes its hash: the coordinator's check catches it.
    with torch.no_grad():
        bn[1].running_mean.add_(0.01)
    assert trs[0].hash() != trs[1].hash()


def test_final_weights_say_format_pt_and_store_tied_weights_once(tmp_path):
    tied = write(tmp_path, BN_TASK.replace("def build_model(args): return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))", '''
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(4, 2)
    def forward(self, x):
        return self.head(self.dec(self.enc(x)))
def build_model(args): return Tied()'''), "tied.py")
    from nimble_worker import safetensors
    tr = trainer(tied, batch_size=8)
    tr.step(0, [8])
    (_, blob), = tr.state("final")
    tensors, meta = safetensors.loads(blob)
    assert meta["format"] == "pt" and json.loads(meta["tied"]) == {"dec.weight": "enc.weight"}
    assert sorted(tensors) == ["enc.weight", "head.bias", "head.weight"]


# Per-token losses over sequences of different lengths: as a (loss_sum, count) pair the
# step's loss is the global token mean whatever the split; as a per-batch mean it is not.
TOKEN_TASK = '''
import torch, torch.nn as nn
class Seqs(torch.utils.data.Dataset):
    def __len__(self): return 40
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randint(1, 9, (1 + (i * 7) % 6,), generator=g)
def collate(items):
    ids = torch.zeros(len(items), max(len(x) for x in items), dtype=torch.long)
    for r, x in enumerate(items):
        ids[r, :len(x)] = x
    return ids
def build_dataset(split, args): return Seqs()
def build_model(args): return nn.Sequential(nn.Embedding(9, 6, padding_idx=0), nn.Tanh(), nn.Linear(6, 3))
def compute_loss(model, ids):
    mask = ids != 0
    nll = nn.functional.cross_entropy(model(ids).reshape(-1, 3), (ids % 3).reshape(-1), reduction="none")
    total = (nll * mask.reshape(-1)).sum()
    return (total, mask.sum()) if FORM == "sum" else total / mask.sum()
def evaluate(model, ids):
    mask = ids != 0
    right = ((model(ids).argmax(-1) == ids % 3) & mask).sum()
    return ({"acc": right}, {"acc": mask.sum()}) if FORM == "sum" else {"acc": right / mask.sum()}
'''


def token_run(tmp_path, form, shares_per_step, world):
    path = tmp_path / f"tokens_{form}.py"
    path.write_text(f"FORM = {form!r}\n" + TOKEN_TASK)
    over = {"batch_size": 12, "optimizer": {"name": "sgd", "lr": 0.5}, "compression": {"method": "none"}}
    ring = ThreadRing(world)
    trs = [Trainer(JobConfig.from_dict({**TINY_CONFIG, **over}), Task(str(path), {}), r, world, "cpu",
                   ring.member(r)) for r in range(world)]
    reports = [[] for _ in range(world)]

    def run(r):
        for t, shares in enumerate(shares_per_step):
            reports[r].append(trs[r].step(t, shares))
    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    return trs, reports


@pytest.mark.parametrize("form, exact", [("sum", True), ("mean", False)])
def test_loss_sum_and_count_is_exact_whatever_the_split(tmp_path, form, exact):
    steps = [[12], [12], [12], [12]]
    (one,), ref = token_run(tmp_path, form, steps, 1)
    # Rank 2 has no share at the first step: it learns the form from one item (a probe).
    trs, reports = token_run(tmp_path, form, [[5, 7, 0], [1, 1, 10], [4, 4, 4], [0, 12, 0]], 3)
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(one.params, trs[0].params))
    if exact:
        assert diff < 1e-6
        for t in range(4):  # every worker reports the global token mean
            assert all(abs(r[t]["loss"] - ref[0][t]["loss"]) < 1e-5 for r in reports)
    else:
        assert diff > 1e-4  # what the pair fixes: a mean per batch depends on the split
    _, sums, counts = one.eval(0, 40, 7)
    _, a_sums, a_counts = trs[0].eval(0, 13, 5)
    _, b_sums, b_counts = trs[1].eval(13, 27, 9)
    if exact:  # token accuracy: sums over counts, from slices of any size
        assert counts["acc"] == a_counts["acc"] + b_counts["acc"] > 40
        whole = sums["acc"] / counts["acc"]
        assert (a_sums["acc"] + b_sums["acc"]) / (a_counts["acc"] + b_counts["acc"]) == pytest.approx(whole, abs=1e-6)


def test_a_loss_that_changes_form_is_a_task_error(tmp_path):
    path = tmp_path / "flip.py"
    path.write_text("FORM = 'sum'\n" + TOKEN_TASK + "\n_n = [0]\n_orig = compute_loss\n"
                    "def compute_loss(model, ids):\n    _n[0] += 1\n    s, c = _orig(model, ids)\n"
                    "    return (s, c) if _n[0] == 1 else s / c\n")
    tr = Trainer(JobConfig.from_dict({**TINY_CONFIG, "batch_size": 12}), Task(str(path), {}), 0, 1, "cpu",
                 lambda b: b.clone())
    tr.step(0, [12])
    with pytest.raises(TaskError, match=r"returned a scalar mean after a \(loss_sum, count\) pair"):
        tr.step(1, [12])


def test_evaluate_sums_and_counts_must_name_the_same_metrics(tmp_path):
    path = tmp_path / "badeval.py"
    path.write_text("FORM = 'sum'\n" + TOKEN_TASK + "\ndef evaluate(model, ids):\n    return {'a': 1.0}, {'b': 2.0}\n")
    tr = Trainer(JobConfig.from_dict({**TINY_CONFIG, "batch_size": 12}), Task(str(path), {}), 0, 1, "cpu",
                 lambda b: b.clone())
    with pytest.raises(TaskError, match=r"evaluate: returned \(sums, counts\) whose metrics differ: \['a', 'b'\]"):
        tr.eval(0, 10, 5)
