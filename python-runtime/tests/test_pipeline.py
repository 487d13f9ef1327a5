"""Pipeline parallelism, the worker side: schedules, the activation codec, splitting a model
into stages without materialising it, and the strategy, exact against one worker."""

import io
import json
import os
import socket
import subprocess
import sys
import threading
from contextlib import redirect_stdout
from functools import lru_cache

import pytest
import torch

from conftest import ROOT
from nimble_worker import safetensors
from nimble_worker.comm import LinkComm, StepAborted
from nimble_worker.compress.fake import PipeGroup
from nimble_worker.config import ConfigError, JobConfig
from nimble_worker.handoff import sync_state
from nimble_worker.link import Link, LinkError
from nimble_worker.pipeline import codec
from nimble_worker.pipeline.profile import main as profile_main
from nimble_worker.pipeline.schedule import actions, bubble_fraction, micro_sizes
from nimble_worker.pipeline.split import build_stage, meta_model, profile_layers
from nimble_worker.task import Task, TaskError
from nimble_worker.train import Trainer

PY = sys.executable

# An MLP of 7 top-level layers; (inputs, targets) batches and Nimble's default loss.
MLP_TASK = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset


class Points(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x[:, :3].argmax(1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def build_dataset(split, args):
    return Points(200 if split == "train" else 40, 1 if split == "train" else 2)


def build_model(args):
    d = args.get("d", 16)
    return nn.Sequential(nn.Linear(6, d), nn.Tanh(), nn.Linear(d, d), nn.Tanh(),
                         nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 3))


def evaluate(model, batch):
    x, y = batch
    logits = model(x)
    return {"loss": F.cross_entropy(logits, y).item(),
            "accuracy": (logits.argmax(1) == y).float().mean().item()}
'''

# The same with a (loss_sum, count) compute_loss: the loss over a sample's 3 outputs.
SUM_TASK = MLP_TASK + '''

def compute_loss(model, batch):
    x, y = batch
    out = model(x)
    target = F.one_hot(y, 3).float()
    return ((out - target) ** 2).sum(), target.numel()
'''

BOUNDS = {1: [0, 7], 2: [0, 3, 7], 3: [0, 2, 5, 7]}
BATCH, M = 16, 4


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    out = {}
    for name, text in (("mlp", MLP_TASK), ("sum", SUM_TASK)):
        (d / f"{name}.py").write_text(text)
        out[name] = str(d / f"{name}.py")
    return out


def config(S, schedule="1f1b", steps=20, **over):
    return JobConfig.from_dict({
        "steps": steps, "batch_size": BATCH, "seed": 5, "prefetch": 0,
        "optimizer": {"name": "sgd", "lr": 0.1, **over.pop("optimizer", {})},
        "compression": {"method": "none"},
        "parallel": {"pipeline_stages": S, "micro_batches": M, "schedule": schedule,
                     **over.pop("parallel", {})}, **over})


def grid(S, D):
    """chains[d][s] = d * S + s."""
    return [[d * S + s for s in range(S)] for d in range(D)]


def trainers(path, cfg, chains, S):
    """One Trainer per rank of `chains` on a PipeGroup (built one after another: the seeded
    init uses torch's global generator)."""
    stage_of = {r: s for c in chains for s, r in enumerate(c)}
    group = PipeGroup(sorted(stage_of), stage_of, timeout=30)
    trs = {r: Trainer(cfg, Task(path, cfg.task_args), r, len(stage_of), "cpu", group.member(r),
                      pipeline={"stage": stage_of[r], "stages": S, "bounds": BOUNDS[S]})
           for r in sorted(stage_of)}
    return group, trs


def train(path, S, chains, schedule="1f1b", steps=20, shares=None, abort_at=None, **over):
    """Runs `steps` steps of the layout; returns (whole-model parameters by name from chain
    0's workers, every rank's reports, the trainers)."""
    cfg = config(S, schedule, steps, **over)
    group, trs = trainers(path, cfg, chains, S)
    shares = shares or micro_sizes(BATCH, len(chains))

    def work(r):
        tr, reports = trs[r], []
        for t in range(steps):
            if t == abort_at:  # prepared, then dropped by every worker: no trace
                before = tr.hash()
                tr.prepare(t, shares, chains=chains)
                assert tr.abort() == t and tr.hash() == before
            reports.append(tr.prepare(t, shares, chains=chains, want_hash=True))
            tr.commit()
        return reports
    reports = group.run(work)
    assert group.pending_messages() == []
    return merged(trs, chains[0]), reports, trs


def merged(trs, ranks):
    out = {}
    for r in ranks:
        rep = trs[r].replica
        out.update({n: p.detach().clone() for n, p in zip(rep.names, rep.trainable)})
    return out


@lru_cache(maxsize=None)
def _reference(path, steps, key):
    over = json.loads(key)
    params, reports, _ = train(path, 1, [[0]], "1f1b", steps, **over)
    return params, [r["loss"] for r in reports[0]]


def reference(path, steps=20, **over):
    """One worker holding the whole model (pipeline_stages 1, the same M)."""
    return _reference(path, steps, json.dumps(over, sort_keys=True))


def assert_matches(params, losses, ref, tol=1e-4):
    ref_params, ref_losses = ref
    assert set(params) == set(ref_params)
    worst = max((params[n] - ref_params[n]).abs().max().item() for n in ref_params)
    assert worst < tol, worst
    assert losses == pytest.approx(ref_losses, abs=1e-5)


# ---- schedules ---------------------------------------------------------------------
def test_schedules_for_three_stages_and_four_micro_batches():
    F = [("F", k) for k in range(4)]
    B = [("B", k) for k in range(4)]
    for s in range(3):
        assert actions("gpipe", s, 3, 4) == F + B
    assert actions("1f1b", 0, 3, 4) == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("B", 2), ("B", 3)]
    assert actions("1f1b", 1, 3, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)]
    assert actions("1f1b", 2, 3, 4) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3), ("B", 3)]
    with pytest.raises(ValueError):
        actions("zb", 0, 3, 4)


@pytest.mark.parametrize("S,M", [(1, 1), (2, 1), (3, 4), (4, 2), (5, 8), (8, 3)])
def test_every_forward_before_its_backward_and_1f1b_holds_few(S, M):
    for s in range(S):
        for schedule in ("gpipe", "1f1b"):
            acts = actions(schedule, s, S, M)
            assert sorted(acts) == sorted([("F", k) for k in range(M)] + [("B", k) for k in range(M)])
            assert all(acts.index(("F", k)) < acts.index(("B", k)) for k in range(M))
            assert [k for kind, k in acts if kind == "F"] == list(range(M))  # in order
            alive = most = 0
            for kind, _ in acts:
                alive += 1 if kind == "F" else -1
                most = max(most, alive)
            assert most == (M if schedule == "gpipe" else min(S - s, M))


def test_micro_sizes_and_bubble():
    assert micro_sizes(16, 4) == [4, 4, 4, 4]
    assert micro_sizes(10, 4) == [3, 3, 2, 2]
    assert micro_sizes(3, 4) == [1, 1, 1]  # empty micro-batches are left out
    assert micro_sizes(0, 4) == []
    assert sum(micro_sizes(1001, 7)) == 1001 and max(micro_sizes(1001, 7)) - min(micro_sizes(1001, 7)) <= 1
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15) and bubble_fraction(1, 5) == 0


def test_parallel_config_is_validated():
    cfg = JobConfig.from_dict({"parallel": {"pipeline_stages": 2}})
    assert (cfg.parallel.pipeline_stages, cfg.parallel.micro_batches, cfg.parallel.schedule,
            cfg.parallel.activation_codec) == (2, 4, "1f1b", "none")
    assert JobConfig.from_dict({}).parallel is None
    for bad, field in (({"pipeline_stages": 0}, "parallel.pipeline_stages"),
                       ({"micro_batches": 0}, "parallel.micro_batches"),
                       ({"schedule": "zb"}, "parallel.schedule"),
                       ({"activation_codec": "int4"}, "parallel.activation_codec"),
                       ({"micro_batches": 2.5}, "parallel.micro_batches"),
                       ("two", "parallel")):
        with pytest.raises(ConfigError) as e:
            JobConfig.from_dict({"parallel": bad})
        assert e.value.field == field and field in e.value.message


# ---- the activation codec ------------------------------------------------------------
@pytest.mark.parametrize("name", codec.CODECS)
def test_codec_round_trips(name):
    from nimble_worker.compress.fake import encode
    x = torch.randn(3, 5, 100) * 3
    x[0, 0, :7] = 0
    y = codec.unpack(codec.pack(x, name), 1 << 20, name)
    assert y.shape == x.shape and y.dtype == torch.float32
    if name == "none":
        assert torch.equal(y, x)
    else:  # what the ring's codecs give, bit for bit
        wire = {"fp16": "f16", "bf16": "bf16", "int8": "int8"}[name]
        assert torch.equal(y, encode(x.reshape(-1), wire).view(x.shape))
    if name == "int8":
        assert len(codec.pack(x, name)) < x.numel() * 4 / 3


def test_codec_none_keeps_dtype_and_scalars():
    for t in (torch.randn(4, 2).to(torch.bfloat16), torch.arange(6).view(2, 3), torch.tensor(2.5),
              torch.zeros(0, 3), torch.tensor([True, False])):
        y = codec.unpack(bytearray(codec.pack(t, "none")), 1 << 10, "none")
        assert y.dtype == t.dtype and y.shape == t.shape and torch.equal(y, t)


def test_codec_rejects_malformed_bytes():
    good = codec.pack(torch.randn(2, 3), "none")
    cases = {
        "shorter than": good[:5],
        "magic": b"XXXX" + good[4:],
        "codec number": good[:4] + bytes([9]) + good[5:],
        "dtype number": good[:5] + bytes([77]) + good[6:],
        "dimensions (at most 8)": good[:6] + (9).to_bytes(2, "little") + good[8:],
        "cut short": good[:6] + (3).to_bytes(2, "little") + good[8:24],
        "needs 24 bytes": good[:-1],
        "expected fp16": good,
        "exceeds the limit": good,
    }
    for msg, data in cases.items():
        expected = "fp16" if msg == "expected fp16" else "none"
        limit = 10 if msg == "exceeds the limit" else 1 << 20
        with pytest.raises(ValueError, match=msg.split(" (")[0].replace("(", r"\(")):
            codec.unpack(data, limit, expected)
    huge = good[:8] + (1 << 40).to_bytes(8, "little") + (1 << 40).to_bytes(8, "little")
    with pytest.raises(ValueError, match="exceeds"):
        codec.unpack(huge, 1 << 20, "none")
    with pytest.raises(ValueError, match="floating-point"):
        codec.pack(torch.arange(3), "int8")


# ---- splitting -------------------------------------------------------------------------
def test_stages_keep_the_whole_models_names_and_init(tasks):
    task = Task(tasks["mlp"], {})
    cfg = config(3)
    whole = build_stage(task, cfg, 0, 1, None, "cpu")
    parts = [build_stage(task, cfg, s, 3, BOUNDS[3], "cpu") for s in range(3)]
    assert [p.layers for p in parts] == [[0, 1], [2, 3, 4], [5, 6]]
    assert (parts[0].first, parts[0].last, parts[2].last) == (True, False, True)
    assert sum((p.names for p in parts), []) == whole.names == [n for n, _ in meta_model(task).named_parameters()]
    assert list(parts[1].module.state_dict()) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    flat = {n: t for p in parts for n, t in p.module.state_dict().items()}
    assert all(torch.equal(flat[n], t) for n, t in whole.module.state_dict().items())
    with pytest.raises(TaskError) as e:
        build_stage(task, cfg, 0, 8, None, "cpu")
    assert "8 pipeline stages" in e.value.message and "only 7 top-level layers" in e.value.message


def test_a_model_that_is_not_sequential_needs_build_stages(tmp_path):
    path = tmp_path / "task.py"
    path.write_text("import torch.nn as nn\n"
                    "class Net(nn.Module):\n"
                    "    def __init__(self):\n        super().__init__()\n"
                    "        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)\n"
                    "    def forward(self, x):\n        return self.b(self.a(x).relu())\n"
                    "def build_model(args):\n    return Net()\n"
                    "def build_dataset(split, args):\n    return []\n")
    with pytest.raises(TaskError) as e:
        build_stage(Task(str(path), {}), config(2), 0, 2, None, "cpu")
    assert e.value.where == "task.py: build_model"
    assert e.value.message == ("build_model returned Net, not an nn.Sequential; define "
                               "build_stages(args, n_stages) or return an nn.Sequential")


BUILD_STAGES = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.a(x).relu())


def build_model(args):
    return Net()


def build_stages(args, n_stages):
    if args.get("wrong") == "count":
        return [nn.Linear(4, 8)]
    if args.get("wrong") == "shape":
        return [nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 3))]
    return [nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 2))]


def build_dataset(split, args):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, generator=g), i % 2) for i in range(24)]
'''


def test_build_stages_are_named_positionally(tmp_path):
    path = tmp_path / "task.py"
    path.write_text(BUILD_STAGES)
    cfg = config(2)
    stages = [build_stage(Task(str(path), {}), cfg, s, 2, None, "cpu") for s in range(2)]
    assert [s.names for s in stages] == [["a.weight", "a.bias"], ["b.weight", "b.bias"]]
    assert stages[1].state_names == {"1.weight": "b.weight", "1.bias": "b.bias"}
    assert stages[0].state_names == {"weight": "a.weight", "bias": "a.bias"}
    assert not stages[0].sequential and stages[1].layers == [1]
    for wrong, msg in (("count", "returned 1 modules for 2 stages"), ("shape", "has shape (3, 8)")):
        with pytest.raises(TaskError) as e:
            build_stage(Task(str(path), {"wrong": wrong}), cfg, 0, 2, None, "cpu")
        assert e.value.where == "task.py: build_stages" and msg in e.value.message

    # trained through 2 stages; the final weights carry the whole model's names
    stage_of = {0: 0, 1: 1}
    group = PipeGroup([0, 1], stage_of)
    trs = {r: Trainer(cfg, Task(str(path), {}), r, 2, "cpu", group.member(r),
                      pipeline={"stage": r, "stages": 2, "bounds": None}) for r in (0, 1)}
    group.run(lambda r: [(trs[r].prepare(t, [BATCH], chains=[[0, 1]]), trs[r].commit()) for t in range(3)])
    for r, names in ((0, {"a.weight", "a.bias"}), (1, {"b.weight", "b.bias"})):
        (name, blob), = trs[r].state("final")
        tensors, _ = safetensors.loads(blob)
        assert name == "model.safetensors" and set(tensors) == names
        assert torch.equal(tensors[sorted(names)[1]], trs[r].replica.trainable[0].detach())


def test_a_parameter_no_reset_sets_is_named(tmp_path):
    path = tmp_path / "task.py"
    path.write_text("import torch, torch.nn as nn\n"
                    "class Scale(nn.Module):\n"
                    "    def __init__(self):\n        super().__init__()\n"
                    "        self.g = nn.Parameter(torch.ones(4))\n"
                    "    def forward(self, x):\n        return x * self.g\n"
                    "def build_model(args):\n    return nn.Sequential(nn.Linear(4, 4), Scale())\n"
                    "def build_dataset(split, args):\n    return []\n")
    with pytest.raises(TaskError) as e:
        build_stage(Task(str(path), {}), config(1), 0, 1, None, "cpu")
    assert e.value.where == "task.py: build_model"
    assert "parameter 1.g of Scale is not set by any reset_parameters()" in e.value.message
    assert "give Scale a reset_parameters()" in e.value.message and "build_stages" in e.value.message


PROBE_TASK = '''
import torch
import torch.nn as nn

MODEL = []
LIVE = []  # parameters not on the meta device, whenever a layer runs


class Probe(nn.Linear):
    def forward(self, x):
        LIVE.append(sum(p.numel() for p in MODEL[-1].parameters() if not p.is_meta))
        return super().forward(x)


def build_model(args):
    MODEL.append(nn.Sequential(*[Probe(64, 64) for _ in range(12)], nn.Linear(64, 2)))
    return MODEL[-1]


def build_dataset(split, args):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(64, generator=g), i % 2) for i in range(32)]
'''


def test_profile_materialises_one_layer_at_a_time(tmp_path):
    path = tmp_path / "task.py"
    path.write_text(PROBE_TASK)
    task = Task(str(path), {})
    layers = profile_layers(task, config(2), 8)
    assert len(layers) == 13 and layers[0]["params"] == 64 * 65 and layers[0]["type"] == "Probe"
    assert max(task.module.LIVE) == 64 * 65  # never more than the one layer running
    assert all(p.is_meta for p in task.module.MODEL[-1].parameters())  # each freed after it ran
    first = layers[0]
    assert first["activation_bytes"] == 8 * 64 * 4 and first["saved_bytes"] == 8 * 64 * 4  # the input
    assert first["param_bytes"] == 64 * 65 * 4 and first["forward_backward_s"] > 0


def test_profile_cli_prints_one_json_line(tasks, tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        code = profile_main(["--task", tasks["mlp"], "--config", json.dumps(
            {"batch_size": 16, "parallel": {"pipeline_stages": 2, "micro_batches": 2}}), "--replicas", "2"])
    got = json.loads(out.getvalue().strip().splitlines()[-1])
    assert code == 0 and got["ok"] is True and got["sequential"] is True and got["micro_batch"] == 4
    assert got["model"] == "Sequential (707 parameters)" and got["base_rss_bytes"] > 0
    assert [(x["name"], x["type"]) for x in got["layers"]][:2] == [("0", "Linear"), ("1", "Tanh")]
    assert set(got["layers"][0]) == {"name", "type", "params", "param_bytes", "activation_bytes",
                                     "saved_bytes", "forward_backward_s"}
    assert got["layers"][2]["activation_bytes"] == 4 * 16 * 4
    (tmp_path / "bad.py").write_text("import torch.nn as nn\ndef build_model(args):\n    return nn.GRU(2, 2)\n"
                                     "def build_dataset(split, args):\n    return [0]\n")
    out = io.StringIO()
    with redirect_stdout(out):
        code = profile_main(["--task", str(tmp_path / "bad.py"), "--config", "{}"])
    got = json.loads(out.getvalue())
    # The task is fine; it cannot be split: a config error the coordinator points at parallel with.
    assert code == 2 and got["ok"] is False and got["kind"] == "config" and got["field"] == "parallel.pipeline_stages"
    assert got["message"].startswith("bad.py: build_model: build_model returned GRU, not an nn.Sequential")
    out = io.StringIO()
    with redirect_stdout(out):
        code = profile_main(["--task", tasks["mlp"], "--config", '{"parallel": {"schedule": "x"}}'])
    got = json.loads(out.getvalue())
    assert code == 2 and got == {"ok": False, "kind": "config", "field": "parallel.schedule",
                                 "message": got["message"]}


# ---- exactness against one worker ------------------------------------------------------
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("S,D", [(2, 1), (2, 2), (3, 1)])
def test_layouts_match_one_worker(tasks, S, D, schedule):
    params, reports, trs = train(tasks["mlp"], S, grid(S, D), schedule)
    assert_matches(params, [r["loss"] for r in reports[0]], reference(tasks["mlp"]))
    for d in range(1, D):  # a stage's replicas agree bit for bit
        for s in range(S):
            assert trs[d * S + s].hash() == trs[s].hash()
    last = reports[S - 1][-1]
    assert last["samples"] == BATCH // D and last["micro_batches"] == M and not last["skipped"]
    pipe = last["pipeline"]
    assert pipe["stage"] == S - 1 and pipe["chains"] == [0] and pipe["act_bytes_sent"] > 0
    assert [e[0] for e in pipe["timeline"]] == [k for k, _ in actions(schedule, S - 1, S, M)]
    assert all(e[3] <= e[4] for e in pipe["timeline"])
    assert reports[0][-1]["dense_count"] == sum(p.numel() for p in trs[0].replica.trainable)


@pytest.mark.parametrize("S,D", [(2, 2), (3, 1)])
def test_momentum_and_grad_clip_match_one_worker(tasks, S, D):
    over = {"optimizer": {"momentum": 0.9}, "grad_clip": 0.05}
    ref = reference(tasks["mlp"], **over)
    unclipped = reference(tasks["mlp"], optimizer={"momentum": 0.9})
    assert max((ref[0][n] - unclipped[0][n]).abs().max().item() for n in ref[0]) > 1e-3  # it clips
    params, reports, _ = train(tasks["mlp"], S, grid(S, D), "1f1b", **over)
    assert_matches(params, [r["loss"] for r in reports[0]], ref)


@pytest.mark.parametrize("S,D,schedule", [(2, 2, "gpipe"), (3, 1, "1f1b")])
def test_a_loss_sum_and_count_matches_one_worker(tasks, S, D, schedule):
    params, reports, _ = train(tasks["sum"], S, grid(S, D), schedule)
    assert_matches(params, [r["loss"] for r in reports[0]], reference(tasks["sum"]))
    assert all(reports[r][5]["loss"] == reports[0][5]["loss"] for r in reports)  # the global loss


def test_a_worker_serving_two_chains_matches_one_worker(tasks):
    # rank 2 (stage 0 of chain 1) is gone: rank 0 serves stage 0 of both chains
    chains = [[0, 1], [0, 3]]
    params, reports, trs = train(tasks["mlp"], 2, chains, "1f1b")
    assert_matches(params, [r["loss"] for r in reports[0]], reference(tasks["mlp"]))
    assert trs[1].hash() == trs[3].hash()
    first = reports[0][-1]
    assert first["pipeline"]["chains"] == [0, 1] and first["samples"] == BATCH
    assert first["micro_batches"] == 2 * M and len(first["pipeline"]["timeline"]) == 4 * M
    assert reports[3][-1]["pipeline"]["chains"] == [1]


def test_uneven_shares_and_an_abort_leave_it_exact(tasks):
    params, reports, _ = train(tasks["mlp"], 2, grid(2, 2), "gpipe", steps=6, shares=[11, 5], abort_at=3)
    assert_matches(params, [r["loss"] for r in reports[0]], reference(tasks["mlp"], steps=6))
    assert reports[0][0]["samples"] == 11 and reports[2][0]["samples"] == 5
    assert reports[2][0]["micro_batches"] == 4  # 5 in 2, 1, 1, 1


def test_activation_codecs_run_and_stay_close(tasks):
    ref = reference(tasks["mlp"], steps=5)
    for name, tol in (("bf16", 5e-2), ("int8", 5e-2)):
        params, reports, _ = train(tasks["mlp"], 2, grid(2, 1), "1f1b", steps=5,
                                   parallel={"activation_codec": name})
        worst = max((params[n] - ref[0][n]).abs().max().item() for n in ref[0])
        assert 0 < worst < tol, (name, worst)
        assert reports[0][-1]["pipeline"]["act_bytes_sent"] < 4 * BATCH * 16 * 4 / 1.5


def test_1f1b_holds_fewer_activations_than_gpipe(tasks):
    S = 3
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        _, reports, _ = train(tasks["mlp"], S, grid(S, 1), schedule, steps=2)
        peaks[schedule] = [reports[s][-1]["pipeline"]["peak_saved_bytes"] for s in range(S)]
    for s in range(S):
        assert peaks["gpipe"][s] > 0
        assert peaks["1f1b"][s] <= 1.1 * min(S - s, M) / M * peaks["gpipe"][s], (s, peaks)


def test_evaluation_flows_through_the_stages(tasks):
    ref_cfg = config(1, steps=1)
    one = Trainer(ref_cfg, Task(tasks["mlp"], {}), 0, 1, "cpu", lambda b: b.clone())
    n1, sums1, counts1 = one.eval(0, 40, 7)
    for S, D in ((2, 1), (3, 2)):
        chains = grid(S, D)
        group, trs = trainers(tasks["mlp"], config(S, steps=1), chains, S)
        out = group.run(lambda r: trs[r].strategy.evaluate(0, 40, 7, {"chains": chains, "step": 0}))
        lasts = [c[-1] for c in chains]
        assert all(out[r] == (0, {}, {}) for r in out if r not in lasts)
        assert sum(out[r][0] for r in lasts) == n1 == 40
        for k in sums1:
            assert sum(out[r][1][k] for r in lasts) == pytest.approx(sums1[k], abs=1e-4)
            assert sum(out[r][2][k] for r in lasts) == counts1[k]


def test_final_weights_and_a_state_hand_off_within_a_stage(tasks):
    S, chains = 2, grid(2, 2)
    params, _, trs = train(tasks["mlp"], S, chains, "1f1b", steps=3)
    final = {}
    for r in chains[0]:
        (name, blob), = trs[r].state("final")
        final.update(safetensors.loads(blob)[0])
    assert set(final) == set(params) and all(torch.equal(final[n], params[n]) for n in params)
    files = dict(trs[1].state("checkpoint"))
    assert set(torch.load(io.BytesIO(files["model.pt"]))) == {"4.weight", "4.bias", "6.weight", "6.bias"}
    assert trs[0].describe()["stage"] == 0 and trs[1].describe()["layers"] == [3, 7]
    # rank 2 drifted; it takes rank 0's state over its stage's group (ranks 1 and 3 likewise)
    with torch.no_grad():
        trs[2].replica.trainable[0].add_(1.0)
    group = trs[0].comm.inner.group
    hashes = group.run(lambda r: sync_state(trs[r].replica, trs[r].strategy,
                                            trs[r].strategy.handoff_comm(trs[r].comm), chains[0][r % S]))
    assert hashes[0] == hashes[2] == trs[0].hash() and hashes[1] == hashes[3]
    assert [e[1] for e in group.log if e[0] == "allgather"] == ["stage", "stage"]


def test_one_stage_without_chains_works_as_sync_does(tasks):
    # dry runs and local scripts: pipeline_stages 1, shares per rank, no chains
    cfg = config(1, steps=3)
    tr = Trainer(cfg, Task(tasks["mlp"], {}), 0, 1, "cpu", lambda b: b.clone())
    losses = [tr.step(t, [BATCH])["loss"] for t in range(3)]
    assert losses == pytest.approx(reference(tasks["mlp"], steps=3)[1], abs=0)
    assert tr.strategy.name == "pipeline" and tr.eval(0, 40, 8)[0] == 40


# ---- the worker link -----------------------------------------------------------------
def test_link_comm_headers_and_replies():
    a, b = socket.socketpair()
    ours, theirs = Link(a), Link(b)
    comm = LinkComm(ours, 4, lambda h: None)
    comm.attempt = 7
    seen = []

    def provider():
        h, p = theirs.recv()
        seen.append(h)
        theirs.send({"op": "allreduce_result", "id": h["id"], "dtype": "float32", "count": h["count"],
                     "codec": "f32"}, bytes(p))
        h, p = theirs.recv()
        seen.append(h)
        theirs.send({"op": "allgather_result", "id": h["id"], "sizes": [len(p), 2]}, bytes(p) + b"zz")
        h, p = theirs.recv()
        seen.append((h, bytes(p)))
        theirs.send({"op": "pipe_sent", "id": h["id"]})
        h, _ = theirs.recv()
        seen.append(h)
        theirs.send({"op": "set_speed", "speed": 1})
        theirs.send({"op": "pipe_data", "id": h["id"], "tag": h["tag"]}, b"payload")
        h, _ = theirs.recv()
        theirs.send({"op": "pipe_data", "id": h["id"], "tag": "f:0:0:1"}, b"")
        h, _ = theirs.recv()
        theirs.send({"op": "decide", "step": 0, "verdict": "abort"})
    th = threading.Thread(target=provider)
    th.start()
    assert comm.allreduce(torch.ones(3), group="stage").tolist() == [1, 1, 1]
    assert comm.allgather(b"ab", group="stage") == [b"ab", b"zz"]
    comm.send(3, "f:0:0:0", b"\x01\x02")
    assert comm.recv(1, "b:0:0:0") == b"payload"
    with pytest.raises(LinkError, match="tag 'f:0:0:1', expected 'f:0:0:2'"):
        comm.recv(1, "f:0:0:2")
    with pytest.raises(StepAborted):
        comm.recv(1, "f:0:0:3")
    th.join()
    assert seen[0] == {"op": "allreduce", "id": 0, "dtype": "float32", "count": 3, "codec": "f32",
                       "attempt": 7, "group": "stage"}
    assert seen[1] == {"op": "allgather", "id": 1, "size": 2, "attempt": 7, "group": "stage"}
    assert seen[2] == ({"op": "pipe_send", "id": 2, "to": 3, "tag": "f:0:0:0", "size": 2, "attempt": 7}, b"\x01\x02")
    assert seen[3] == {"op": "pipe_recv", "id": 3, "from": 1, "tag": "b:0:0:0", "attempt": 7}


class StageProviders:
    """Two `python -m nimble_worker` processes (stages 0 and 1 of one chain) and a provider
    for each in a thread: whole-ring all-reduces summed over both, stage all-reduces of a
    lone holder echoed, pipe messages buffered by (from, to, tag)."""

    def __init__(self, cwd):
        self.links, self.procs, self.replies = [], [], []
        self.mail, self.cond = {}, threading.Condition()
        self.sums, self.log = {}, []
        env = {**os.environ, "PYTHONPATH": ROOT}
        for _ in range(2):
            ours, theirs = socket.socketpair()
            self.procs.append(subprocess.Popen(
                [PY, "-c", "import os, sys; os.dup2(int(sys.argv[1]), 3); import runpy; "
                 "runpy.run_module('nimble_worker', run_name='__main__')", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), cwd=cwd, env=env))
            theirs.close()
            self.links.append(Link(ours))
            self.replies.append([])

    def serve(self, rank):
        """Serve rank's collectives until it sends a reply to the order; return the reply."""
        link = self.links[rank]
        while True:
            h, p = link.recv()
            self.log.append((rank, h["op"], h.get("group"), h.get("tag")))
            if h["op"] == "allreduce" and h.get("group") == "stage":
                link.send({"op": "allreduce_result", "id": h["id"], "dtype": "float32", "count": h["count"]}, p)
            elif h["op"] == "allreduce":
                with self.cond:
                    key = len([x for x in self.log if x[0] == rank and x[1] == "allreduce" and x[2] is None])
                    self.sums.setdefault(key, {})[rank] = torch.frombuffer(bytearray(p), dtype=torch.float32)
                    self.cond.notify_all()
                    self.cond.wait_for(lambda: len(self.sums[key]) == 2, 30)
                    total = self.sums[key][0] + self.sums[key][1]
                link.send({"op": "allreduce_result", "id": h["id"], "dtype": "float32", "count": h["count"]},
                          total.numpy().tobytes())
            elif h["op"] == "pipe_send":
                with self.cond:
                    self.mail[(rank, h["to"], h["tag"])] = bytes(p)
                    self.cond.notify_all()
                link.send({"op": "pipe_sent", "id": h["id"]})
            elif h["op"] == "pipe_recv":
                key = (h["from"], rank, h["tag"])
                with self.cond:
                    assert self.cond.wait_for(lambda: key in self.mail, 30)
                    data = self.mail.pop(key)
                link.send({"op": "pipe_data", "id": h["id"], "tag": h["tag"]}, data)
            else:
                return h, p

    def request(self, headers):
        """Send headers[r] to rank r and serve both until each has replied."""
        out = [None, None]

        def go(r):
            self.links[r].send(headers[r])
            out[r] = self.serve(r)
        threads = [threading.Thread(target=go, args=(r,)) for r in range(2)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        return out


def test_two_stage_workers_on_the_link(tasks, tmp_path):
    w = StageProviders(tmp_path)
    cfg = {"steps": 3, "batch_size": BATCH, "seed": 5, "optimizer": {"name": "sgd", "lr": 0.1},
           "compression": {"method": "none"}, "parallel": {"pipeline_stages": 2, "micro_batches": M}}
    ready = w.request([{"op": "init", "task_path": tasks["mlp"], "config": cfg, "rank": r, "world_size": 2,
                        "device": "cpu", "threads": 1,
                        "pipeline": {"stage": r, "stages": 2, "bounds": BOUNDS[2]}} for r in range(2)])
    assert [h["op"] for h, _ in ready] == ["ready", "ready"]
    assert [(h["stage"], h["layers"], h["params"]) for h, _ in ready] == [(0, [0, 3], 384), (1, [3, 7], 323)]
    losses = []
    for t in range(3):
        order = {"op": "pipe_step", "step": t, "chains": [[0, 1]], "shares": [BATCH], "want_hash": False,
                 "attempt": 0, **({"decision": {"step": t - 1, "verdict": "commit"}} if t else {})}
        (h0, _), (h1, _) = w.request([order, order])
        assert h0["op"] == h1["op"] == "step_done" and h0["loss"] == h1["loss"]
        assert h0["pipeline"]["stage"] == 0 and len(h1["pipeline"]["timeline"]) == 2 * M
        losses.append(h0["loss"])
    assert losses == pytest.approx(reference(tasks["mlp"], steps=3)[1][:3], abs=1e-6)
    sends = [x for x in w.log if x[1] == "pipe_send"]
    assert sorted(x[3] for x in sends if x[0] == 0) == sorted(f"f:{t}:0:{k}" for t in range(3) for k in range(M))
    ev = {"op": "eval", "step": 3, "start": 0, "count": 40, "batch_size": 16, "chains": [[0, 1]],
          "decision": {"step": 2, "verdict": "commit"}}
    (e0, _), (e1, _) = w.request([ev, ev])
    assert e0["count"] == 0 and e0["sums"] == {} and e1["count"] == 40 and set(e1["sums"]) == {"loss", "accuracy"}
    (s0, p0), (s1, p1) = w.request([{"op": "state", "kind": "final"}] * 2)
    assert set(safetensors.loads(p0)[0]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert set(safetensors.loads(p1)[0]) == {"4.weight", "4.bias", "6.weight", "6.bias"}
    for link, proc in zip(w.links, w.procs):
        link.send({"op": "stop"})
        assert proc.wait(timeout=30) == 0


def test_a_non_finite_loss_skips_the_step_on_every_stage(tmp_path):
    path = tmp_path / "task.py"
    path.write_text(MLP_TASK + "\n\ndef compute_loss(model, batch):\n"
                    "    x, y = batch\n    return F.cross_entropy(model(x), y) * float('nan')\n")
    cfg = config(2, steps=2)
    group, trs = trainers(str(path), cfg, grid(2, 2), 2)
    before = {r: tr.hash() for r, tr in trs.items()}
    reports = group.run(lambda r: [(trs[r].prepare(t, [8, 8], chains=grid(2, 2)), trs[r].commit())[0]
                                   for t in range(2)])
    for r, tr in trs.items():
        assert tr.hash() == before[r] and tr.next_step == 2
        assert all(x["skipped"] and x["loss"] == 0 and x["nonfinite"][0] == "loss" for x in reports[r])


def test_a_worker_in_no_chain_joins_the_ring_collectives_only(tasks):
    # a 2 x 2 grid whose second chain is left out: ranks 2 and 3 idle, their stages held alone
    cfg = config(2, steps=3)
    stage_of = {0: 0, 1: 1, 2: 0, 3: 1}
    group = PipeGroup([0, 1, 2, 3], stage_of, timeout=30)
    trs = {r: Trainer(cfg, Task(tasks["mlp"], {}), r, 4, "cpu", group.member(r),
                      pipeline={"stage": stage_of[r], "stages": 2, "bounds": BOUNDS[2]}) for r in range(4)}
    reports = group.run(lambda r: [(trs[r].prepare(t, [BATCH], chains=[[0, 1]]), trs[r].commit())[0]
                                   for t in range(3)])
    assert_matches(merged(trs, [0, 1]), [x["loss"] for x in reports[0]], reference(tasks["mlp"], steps=3))
    idle = reports[2][-1]
    assert idle["samples"] == 0 and idle["pipeline"]["chains"] == [] and idle["loss"] == reports[0][-1]["loss"]
    assert trs[2].next_step == 3 and not idle["skipped"]
    assert {e[1] for e in group.log if e[0] == "allreduce"} == {None}  # each stage held alone
