"""Checkpoints composed of the replica, the strategy and the compressor; strategies by config."""

import io
import json
import os

import pytest
import torch

from conftest import TINY_CONFIG
from nimble_worker import strategies
from nimble_worker.compress.fake import FakeGroup
from nimble_worker.config import ConfigError, JobConfig
from nimble_worker.strategies.sync import Sync
from nimble_worker.task import Task
from nimble_worker.train import Trainer
from test_worker import FakeProvider

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoint-v1")
PSGD = {"method": "powersgd", "rank": 1, "start_step": 2}


def trainer(task_path, rank=0, world=1, comm=lambda b: b.clone(), **over):
    cfg = JobConfig.from_dict({**TINY_CONFIG, "compression": PSGD, **over})
    return Trainer(cfg, Task(task_path, cfg.task_args), rank, world, "cpu", comm)


def read_fixture():
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        expected = json.load(f)
    files = {}
    for name in expected["files"]:
        with open(os.path.join(FIXTURE, name), "rb") as f:
            files[name] = f.read()
    return expected, files


def test_a_checkpoint_written_before_the_replica_split_loads_and_continues_the_run(tiny_task, tmp_path):
    # Written by the worker of commit 612ca1c (fixtures/make_checkpoint.py): 3 steps of the
    # tiny task with PowerSGD, then what the uninterrupted run did in steps 3 to 5.
    expected, files = read_fixture()
    w = FakeProvider(tmp_path)
    w.init(tiny_task, compression=PSGD)
    header = {"op": "load_state", "files": [{"name": n, "size": len(b)} for n, b in files.items()]}
    loaded, _ = w.request(header, b"".join(files.values()))
    assert loaded == {"op": "loaded", "step": expected["step"]}
    h, _ = w.request({"op": "decide", "step": expected["step"] - 1, "verdict": "commit"})
    assert h["hash"] == expected["hash"] and h["next_step"] == expected["step"]  # loading is exact
    for want in expected["after"]:
        h, _ = w.request({"op": "step", "step": want["step"], "shares": [8], "want_hash": False})
        assert h["op"] == "step_done" and h["lr"] == want["lr"]
        assert h["loss"] == pytest.approx(want["loss"], abs=1e-6)
    # Steps 3 to 5 were compressed with the checkpoint's Q and error-feedback memory: a
    # fresh compressor state would have taken another path.
    assert [a["count"] for a in w.allreduces] == [26 + 8, 4] * 3
    h, p = w.request({"op": "state", "kind": "checkpoint"})
    got = torch.load(io.BytesIO(p[:h["files"][0]["size"]]), weights_only=True)
    want = expected["after"][-1]["params"]
    for tensor, values in zip(got.values(), want):
        assert torch.allclose(tensor.reshape(-1), torch.tensor(values), atol=1e-6, rtol=0)
    assert w.stop() == 0


def test_sync_checkpoints_keep_todays_files_and_resume_exactly(tiny_task):
    ran = trainer(tiny_task)
    for t in range(3):
        ran.step(t, [8])
    files = dict(ran.state("checkpoint"))
    assert list(files) == ["model.pt", "optimizer.pt", "schedule.pt", "data.json", "rng.pt",
                           "meta.json", "compressor.pt"]  # sync has no strategy.pt
    assert json.loads(files["meta.json"])["config"]["strategy"]["name"] == "sync"
    resumed = trainer(tiny_task)
    assert resumed.load_state(files) == 3 and resumed.hash() == ran.hash()
    for t in (3, 4):
        assert resumed.step(t, [8])["loss"] == ran.step(t, [8])["loss"]
    assert resumed.hash() == ran.hash()
    with pytest.raises(ValueError, match="missing rng.pt, meta.json"):
        trainer(tiny_task).load_state({k: v for k, v in files.items()
                                       if k not in ("rng.pt", "meta.json")})


class Counting(Sync):
    """A strategy with state of its own, as DiLoCo's outer parameters will be: rounds
    committed so far, the same on every replica."""
    name = "counting"

    def __init__(self, cfg, replica, comm):
        super().__init__(cfg, replica, comm)
        self.rounds = torch.zeros(1)

    def commit(self):
        if self.pending is not None:
            self.rounds += 1
        super().commit()

    def state_dict(self):
        return {"rounds": self.rounds.clone()}

    def load_state_dict(self, state):
        self.rounds = state["rounds"].clone()


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setitem(strategies.STRATEGIES, "counting", Counting)


def test_a_strategys_own_state_is_checkpointed_and_handed_to_joiners(tiny_task, counting, capsys):
    ran = trainer(tiny_task, strategy={"name": "counting"})
    assert isinstance(ran.strategy, Counting)
    for t in range(3):
        ran.step(t, [8])
    files = dict(ran.state("checkpoint"))
    assert list(files)[-1] == "strategy.pt"
    resumed = trainer(tiny_task, strategy={"name": "counting"})
    resumed.load_state(files)
    assert resumed.strategy.rounds.item() == 3 and resumed.hash() == ran.hash()
    # Resumed under another strategy: the replica's state loads, the strategy's is left.
    as_sync = trainer(tiny_task)
    assert as_sync.load_state(files) == 3 and as_sync.hash() == ran.hash()
    assert "'counting''s; sync starts its own afresh" in capsys.readouterr().err
    # A joiner takes the strategy's state with the rest, over one all-gather.
    group = FakeGroup(2)
    pair = [trainer(tiny_task, rank=r, world=2, comm=group.member(r), strategy={"name": "counting"})
            for r in range(2)]
    pair[0].load_blob(ran.state_blob())
    group.run(lambda r: pair[r].sync_state(0))
    assert pair[1].strategy.rounds.item() == 3 and pair[1].hash() == ran.hash()


def test_the_strategy_is_chosen_by_config_and_an_unknown_one_is_a_config_error(tiny_task, tmp_path):
    assert JobConfig.from_dict({}).strategy.name == "sync"
    assert isinstance(trainer(tiny_task).strategy, Sync)
    with pytest.raises(ConfigError) as e:
        trainer(tiny_task, strategy={"name": "gossip"})
    assert e.value.field == "strategy.name" and "'gossip' is not one of sync" in e.value.message
    w = FakeProvider(tmp_path)  # as a provider sees it: an error naming the field
    h, _ = w.init(tiny_task, strategy={"name": "gossip"})
    assert h["op"] == "error" and h["kind"] == "config" and h["field"] == "strategy.name"
    assert w.proc.wait(timeout=30) == 3


class _Payload:
    """What a hostile checkpoint or peer would send: unpickling it runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payloads_in_checkpoints_and_joiner_state_are_refused_unrun(tiny_task, tmp_path):
    ran = trainer(tiny_task)
    ran.step(0, [8])
    files = dict(ran.state("checkpoint"))
    marker = tmp_path / "ran-code"
    buf = io.BytesIO()
    torch.save({"weights": _Payload(str(marker))}, buf)
    for name in ("model.pt", "optimizer.pt", "rng.pt", "compressor.pt"):
        with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
            trainer(tiny_task).load_state({**files, name: buf.getvalue()})
    assert not marker.exists()
    from nimble_worker.checkpoint import load_state_blob
    fresh = trainer(tiny_task)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        load_state_blob(fresh.replica, fresh.strategy, buf.getvalue())
    assert not marker.exists()
