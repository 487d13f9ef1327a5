"""The worker as the provider sees it: a subprocess speaking frames on fd 3."""

import io
import json
import os
import socket
import subprocess
import sys

import torch

from conftest import ROOT, TINY_CONFIG
from nimble_worker import safetensors
from nimble_worker.link import Link, LinkClosed

STEPS = 6
CODECS = ("f32", "f16", "bf16", "int8", "int4")
# rank 1 compresses the (8, 4) weight of the tiny model (1 x 12 x 2 < 32), not the (2, 8)
PSGD = {"method": "powersgd", "rank": 1, "start_step": 2}


class FakeProvider:
    """Starts `python -m nimble_worker` with a socketpair on fd 3; world_size 1, so an
    all-reduce is answered with the same bytes."""

    def __init__(self, cwd, shared=False):
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": ROOT, "NIMBLE_HOME": str(cwd)}
        # shared: a memfd on the worker's fd 4, as a provider with the native addon gives it
        self.shared = os.memfd_create("test", os.MFD_ALLOW_SEALING) if shared else None
        fds = (theirs.fileno(),) + ((self.shared,) if shared else ())
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import os, sys; os.dup2(int(sys.argv[1]), 3); "
             "len(sys.argv) > 2 and os.dup2(int(sys.argv[2]), 4); "
             "import runpy; runpy.run_module('nimble_worker', run_name='__main__')",
             *[str(fd) for fd in fds]],
            pass_fds=fds, cwd=cwd, env=env,
            stdout=None, stderr=None)
        theirs.close()
        self.sock = ours
        self.link = Link(ours)
        self.allreduces = []
        self.undecided = None  # the step reported and not yet decided

    # Orders that carry the last round's decision, as the coordinator sends them (protocol v2).
    RIDES = ("step", "eval", "state", "sync_state")

    def request(self, header, payload=b""):
        if self.undecided is not None and header["op"] in self.RIDES and "decision" not in header:
            header = {**header, "decision": {"step": self.undecided, "verdict": "commit"}}
        if "decision" in header or header["op"] == "decide":
            self.undecided = None
        self.link.send(header, payload)
        while True:
            h, p = self.link.recv()
            if h["op"] == "step_done":
                self.undecided = h["step"]
            if h["op"] == "allgather":
                assert len(p) == h["size"]
                self.allreduces.append(h)
                self.link.send({"op": "allgather_result", "id": h["id"], "sizes": [len(p)]}, p)
                continue
            if h["op"] != "allreduce":
                return h, p
            self.allreduces.append(h)
            reply = {"op": "allreduce_result", "id": h["id"], "dtype": "float32",
                     "count": h["count"], "codec": h["codec"]}
            assert h["dtype"] == "float32" and h["codec"] in CODECS
            if h.get("shared"):  # one worker: the sum is already where it wrote it
                assert self.shared is not None and len(p) == 0
                assert os.fstat(self.shared).st_size >= 4 * h["count"]
                self.link.send({**reply, "shared": True})
                continue
            assert len(p) == 4 * h["count"]
            self.link.send(reply, p)

    def init(self, task_path, **over):
        over.setdefault("compression", PSGD)
        return self.request({"op": "init", "task_path": task_path,
                             "config": {**TINY_CONFIG, **over}, "rank": 0, "world_size": 1,
                             "device": "cpu", "threads": 1,
                             **({"shared_fd": 4} if self.shared is not None else {})})

    def stop(self):
        self.link.send({"op": "stop"})
        return self.proc.wait(timeout=30)


def steps(w, start, stop):
    out = []
    for t in range(start, stop):
        h, _ = w.request({"op": "step", "step": t, "shares": [8], "want_hash": True})
        assert h["op"] == "step_done", h
        out.append(h)
    return out


def test_full_session_and_resume_from_checkpoint(tiny_task, tmp_path):
    # uninterrupted run
    w = FakeProvider(tmp_path)
    ready, _ = w.init(tiny_task)
    assert ready == {"op": "ready", "params": 58, "param_bytes": 232,
                     "model": "Sequential (58 parameters)", "train_size": 50, "val_size": 20}
    synced, _ = w.request({"op": "sync"})
    assert synced["op"] == "synced" and len(synced["hash"]) == 64
    full = steps(w, 0, STEPS)
    assert [r["step"] for r in full] == list(range(STEPS))
    assert all(r["samples"] == 8 and r["comm_s"] >= 0 and r["compute_s"] > 0 for r in full)
    assert all(r["dense_count"] == 58 and r["skipped"] is False for r in full)
    assert full[0]["lr"] == 0.005 and full[1]["lr"] == 0.01  # 2 warmup steps of lr 0.01
    ids = [h["id"] for h in w.allreduces]
    assert ids == list(range(1 + 2 + 2 * (STEPS - 2)))
    # sync, 2 plain steps, then per step: uncompressed pack (8 + 16 + 2) with P (8 x 1), Q (4 x 1)
    assert [h["count"] for h in w.allreduces] == [58, 58, 58] + [26 + 8, 4] * (STEPS - 2)
    h, _ = w.request({"op": "eval", "step": STEPS, "start": 0, "count": 20, "batch_size": 7})
    assert h["op"] == "eval_done" and h["count"] == 20 and set(h["sums"]) == {"loss", "accuracy"}
    assert 0 <= h["sums"]["accuracy"] <= 20
    h, p = w.request({"op": "state", "kind": "final"})
    assert h["kind"] == "final" and h["step"] == STEPS
    assert h["files"] == [{"name": "model.safetensors", "size": len(p)}]
    tensors, meta = safetensors.loads(p)
    assert set(tensors) == {"0.weight", "0.bias", "2.weight", "2.bias"} and meta["step"] == "6"
    assert w.stop() == 0

    # interrupted: 3 steps, checkpoint, stop; a fresh worker resumes
    w = FakeProvider(tmp_path)
    w.init(tiny_task)
    w.request({"op": "sync"})
    first = steps(w, 0, 3)
    h, ckpt = w.request({"op": "state", "kind": "checkpoint"})
    assert [f["name"] for f in h["files"]] == ["model.pt", "optimizer.pt", "schedule.pt",
                                               "data.json", "rng.pt", "meta.json",
                                               "compressor.pt"]
    assert h["step"] == 3 and sum(f["size"] for f in h["files"]) == len(ckpt)
    assert w.stop() == 0
    offsets = {}
    at = 0
    for f in h["files"]:
        offsets[f["name"]] = ckpt[at:at + f["size"]]
        at += f["size"]
    assert json.loads(offsets["data.json"]) == {"step": 3}
    assert json.loads(offsets["meta.json"])["world_size"] == 1
    comp = torch.load(io.BytesIO(offsets["compressor.pt"]), weights_only=True)
    assert comp["rank"] == 0 and comp["method"] == "powersgd"
    assert set(comp["state"]["q"]) == {"0.weight"} and comp["state"]["q"]["0.weight"].shape == (4, 1)
    mem = comp["state"]["memory"]
    assert set(mem) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert mem["0.weight"].abs().sum() > 0  # the rank-1 residual of the compressed weight
    assert mem["2.weight"].abs().sum() == 0  # one worker: uncompressed tensors leave none

    w = FakeProvider(tmp_path)
    w.init(tiny_task)
    loaded, _ = w.request({"op": "load_state", "files": h["files"]}, ckpt)
    assert loaded == {"op": "loaded", "step": 3}
    rest = steps(w, 3, STEPS)
    assert [r["hash"] for r in first + rest] == [r["hash"] for r in full]
    assert [r["loss"] for r in first + rest] == [r["loss"] for r in full]
    assert [r["lr"] for r in first + rest] == [r["lr"] for r in full]
    assert w.stop() == 0


def test_task_error_is_reported_and_exits_3(tmp_path):
    task = tmp_path / "bad.py"
    task.write_text("import torch\n"
                    "def build_model(args):\n    raise RuntimeError('no GPU for you')\n"
                    "def build_dataset(split, args):\n    return [(torch.zeros(2), 0)]\n")
    w = FakeProvider(tmp_path)
    h, _ = w.init(str(task))
    assert h["op"] == "error" and h["kind"] == "task" and h["where"] == "bad.py: build_model"
    assert "RuntimeError: no GPU for you" in h["message"]
    assert w.proc.wait(timeout=30) == 3


def test_nan_loss_joins_the_allreduce_and_skips_the_step(tmp_path):
    task = tmp_path / "task.py"
    task.write_text("import torch, torch.nn as nn\n"
                    "def build_model(args):\n    return nn.Linear(2, 1)\n"
                    "def build_dataset(split, args):\n    return [(torch.ones(2), 0.0)] * 4\n"
                    "def compute_loss(model, batch):\n"
                    "    x, y = batch\n    return (model(x).sum() * float('nan'))\n")
    w = FakeProvider(tmp_path)
    assert w.init(str(task), batch_size=2)[0]["op"] == "ready"
    before, _ = w.request({"op": "sync"})
    for t in range(3):  # plain steps, then powersgd steps: skipped at the first all-reduce
        h, _ = w.request({"op": "step", "step": t, "shares": [2], "want_hash": True})
        assert h["op"] == "step_done" and h["skipped"] is True and h["loss"] == 0
        assert h["nonfinite"] == ["loss", "weight", "bias"] and h["hash"] == before["hash"]
    assert len(w.allreduces) == 4
    assert w.stop() == 0


def test_impossible_powersgd_rank_is_a_config_error(tiny_task, tmp_path):
    w = FakeProvider(tmp_path)
    h, _ = w.init(tiny_task, compression={"method": "powersgd", "rank": 128})
    assert h["op"] == "error" and h["kind"] == "config" and h["field"] == "compression.rank"
    assert h["message"] == ("compression.rank 128 is larger than the smaller dimension of every "
                            "weight matrix worth compressing (largest possible: 4)")
    assert w.proc.wait(timeout=30) == 3


def test_bad_message_is_internal_error_and_closed_link_exits_4(tiny_task, tmp_path):
    w = FakeProvider(tmp_path)
    w.init(tiny_task)
    h, _ = w.request({"op": "frobnicate"})
    assert h["op"] == "error" and h["kind"] == "internal" and "frobnicate" in h["message"]
    assert w.proc.wait(timeout=30) == 3

    w = FakeProvider(tmp_path)
    w.init(tiny_task)
    w.sock.close()
    assert w.proc.wait(timeout=30) == 4


def test_topk_and_codecs_on_the_link(tiny_task, tmp_path):
    w = FakeProvider(tmp_path)
    w.init(tiny_task, compression={"method": "topk", "ratio": 0.1, "start_step": 1})
    w.request({"op": "sync"})
    reports = steps(w, 0, 3)
    assert all(not r["skipped"] and r["dense_count"] == 58 for r in reports)
    ops = [(h["op"], h["id"]) for h in w.allreduces]
    assert ops == [("allreduce", 0), ("allreduce", 1), ("allgather", 2), ("allgather", 3)]
    assert {h["size"] for h in w.allreduces[2:]} == {1 + 8 * 6}  # flag, 6 indices, 6 values
    assert w.stop() == 0


def test_int8_codec_is_announced(tiny_task, tmp_path):
    w = FakeProvider(tmp_path)
    w.init(tiny_task, compression={"method": "int8"})
    w.request({"op": "sync"})
    steps(w, 0, 2)
    assert [h["codec"] for h in w.allreduces] == ["f32", "int8", "int8"]
    assert w.stop() == 0


def test_micro_batches_and_set_speed_on_the_link(tiny_task, tmp_path):
    w = FakeProvider(tmp_path)
    ready, _ = w.request({"op": "init", "task_path": tiny_task, "rank": 0, "world_size": 1,
                         "device": "cpu", "threads": 1, "max_micro_batch": 3, "speed": 0.5,
                         "config": {**TINY_CONFIG, "compression": {"method": "none"}}})
    assert ready["op"] == "ready", ready
    w.link.send({"op": "set_speed", "speed": 1})  # no reply
    h, _ = w.request({"op": "step", "step": 0, "shares": [8], "want_hash": False})
    assert h["op"] == "step_done" and h["micro_batches"] == 3 and h["samples"] == 8
    # set_speed may also arrive while the worker waits for an allreduce_result
    w.link.send({"op": "step", "step": 1, "shares": [8], "want_hash": False,
                 "decision": {"step": 0, "verdict": "commit"}})
    ar, p = w.link.recv()
    assert ar["op"] == "allreduce"
    w.link.send({"op": "set_speed", "speed": 0.25})
    w.link.send({"op": "allreduce_result", "id": ar["id"], "dtype": "float32",
                 "count": ar["count"], "codec": ar["codec"]}, p)
    h, _ = w.link.recv()
    assert h["op"] == "step_done" and h["step"] == 1
    h, _ = w.request({"op": "set_speed", "speed": 0})  # out of (0, 1]: internal error
    assert h["op"] == "error" and h["kind"] == "internal" and "speed" in h["message"]
    assert w.proc.wait(timeout=30) == 3


def test_decisions_ride_on_orders_and_an_abort_mid_round_drops_it(tiny_task, tmp_path):
    """Protocol v2: each round ends with the coordinator's decision, on the next order or
    alone (`decide`); the worker applies it on receipt, and only then reads its state."""
    w = FakeProvider(tmp_path)
    w.init(tiny_task, compression={"method": "none"})
    w.request({"op": "sync"})
    first = w.request({"op": "step", "step": 0, "shares": [8], "want_hash": True})[0]
    # Round 1 starts; a member elsewhere is lost: the abort arrives instead of the result.
    w.link.send({"op": "step", "step": 1, "shares": [8], "want_hash": True, "attempt": 1,
                 "decision": {"step": 0, "verdict": "commit"}})
    w.undecided = None
    assert w.link.recv()[0]["op"] == "allreduce"
    w.link.send({"op": "decide", "step": 1, "verdict": "abort"})
    aborted, _ = w.link.recv()
    assert aborted["op"] == "decided" and aborted["verdict"] == "abort"
    assert aborted["step"] == 1 and aborted["next_step"] == 1  # step 0 applied, 1 dropped
    assert aborted["hash"] != first["hash"]
    # The redo is the same round, and a flushed commit reports the hash after it.
    redo, _ = w.request({"op": "step", "step": 1, "shares": [8], "want_hash": True})
    assert redo["op"] == "step_done" and redo["hash"] == aborted["hash"]
    done, _ = w.request({"op": "decide", "step": 1, "verdict": "commit"})
    assert (done["op"], done["next_step"]) == ("decided", 2) and done["hash"] != redo["hash"]
    again, _ = w.request({"op": "decide", "step": 1, "verdict": "commit"})
    assert again["hash"] == done["hash"] and again["next_step"] == 2  # a second flush: no-op
    assert w.stop() == 0

    # Reading the replica before its round is decided is a coordinator bug: refused loudly.
    w = FakeProvider(tmp_path)
    w.init(tiny_task, compression={"method": "none"})
    w.request({"op": "step", "step": 0, "shares": [8], "want_hash": False})
    h, _ = w.request({"op": "eval", "step": 0, "start": 0, "count": 4, "batch_size": 4,
                      "decision": None})
    assert h["op"] == "error" and "eval while step 0 awaits its decision" in h["message"]
    assert w.proc.wait(timeout=30) == 3

    # So is a decision for a round other than the one prepared.
    w = FakeProvider(tmp_path)
    w.init(tiny_task, compression={"method": "none"})
    w.request({"op": "step", "step": 0, "shares": [8], "want_hash": False})
    h, _ = w.request({"op": "decide", "step": 3, "verdict": "commit"})
    assert h["op"] == "error" and "decision for step 3, but step 0 is the one prepared" in h["message"]
    assert w.proc.wait(timeout=30) == 3


def test_a_sync_from_a_rank_the_job_does_not_have_is_refused(tiny_task, tmp_path):
    # Every worker would contribute zeros: the weights would all become 0.
    w = FakeProvider(tmp_path)
    w.init(tiny_task)
    h, _ = w.request({"op": "sync", "source": 5})
    assert h["op"] == "error" and "source rank 5 is not a rank of this job (world size 1)" in h["message"]
    assert w.proc.wait(timeout=30) == 3


def test_all_reduces_through_the_shared_buffer_train_the_same(tiny_task, tmp_path):
    runs = []
    for shared in (False, True):
        w = FakeProvider(tmp_path, shared=shared)
        w.init(tiny_task, compression={"method": "none"})
        w.request({"op": "sync"})
        runs.append([r["hash"] for r in steps(w, 0, 3)])
        h, p = w.request({"op": "state", "kind": "final"})
        assert h["op"] == "state" and h["files"][0]["size"] == len(p)
        tensors, meta = safetensors.loads(bytes(p))
        assert meta["format"] == "pt" and "weight" in " ".join(tensors)
        # every all-reduce (the sync, the gradient) went through the file, none as a payload
        assert all(bool(a.get("shared")) == shared for a in w.allreduces if a["op"] == "allreduce")
        assert w.stop() == 0
    assert runs[0] == runs[1]
