"""DiLoCo / Streaming DiLoCo (strategies/diloco.py): torchft's recorded histories bit for
bit, the weighting, the config checks, the fragments, aborts and retries, checkpoints,
joiners, and the worker link."""

import io
import json
import os

import pytest
import torch
from torch import nn

from conftest import TINY_CONFIG
from nimble_worker import safetensors
from nimble_worker.comm import StepAborted
from nimble_worker.compress.fake import FakeGroup
from nimble_worker.config import ConfigError, JobConfig
from nimble_worker.strategies.diloco import DiLoCo
from nimble_worker.strategies.fragments import balanced_split, partition
from nimble_worker.task import Task
from nimble_worker.train import Trainer
from test_worker import FakeProvider
from test_knobs import BN_TASK

# torchft's recorded regression histories (BSD-3-Clause; see the folder's README.md)
ORACLES = os.path.join(os.path.dirname(__file__), "fixtures", "torchft-diloco")

# torchft's regression setup: two 1x1 weights layers.0 / layers.1 (fragment i = layer i)
# starting at 1.0, gradient 2.0 at every inner step (the loss ignores the batch), inner
# SGD lr 1, outer SGD lr 2, sync_every 6 over 2 fragments.
MOCKED_TASK = '''
import torch, torch.nn as nn
class Zeros(torch.utils.data.Dataset):
    def __len__(self): return 8
    def __getitem__(self, i): return torch.zeros(1)
class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(1, 1, bias=False) for _ in range(2)])
        for layer in self.layers:
            nn.init.ones_(layer.weight)
def build_dataset(split, args): return Zeros()
def build_model(args): return Two()
def compute_loss(model, batch):
    return 2 * sum(layer.weight.sum() for layer in model.layers) + 0 * batch.sum()
def evaluate(model, batch): return {"w0": float(model.layers[0].weight)}
'''
MOCKED = {"steps": 60, "batch_size": 2, "prefetch": 0, "optimizer": {"name": "sgd", "lr": 1.0}}
CASES = {0: (0, 0.0), 1: (0, 0.5), 2: (0, 1.0), 3: (1, 0.0), 4: (1, 0.5), 5: (1, 1.0)}

# A loss linear in the weights (gradient: the batch mean of x, whatever the weights), so
# that share-weighted local means average to the global batch mean.
LINEAR_TASK = MOCKED_TASK.replace(
    "def __getitem__(self, i): return torch.zeros(1)",
    "def __getitem__(self, i): return torch.tensor([float(i + 1)])").replace(
    "return 2 * sum(layer.weight.sum() for layer in model.layers) + 0 * batch.sum()",
    "return sum((layer.weight.sum() * batch).mean() for layer in model.layers)")



def write(tmp_path, text, name="task.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def diloco(task_path, rank=0, world=1, comm=lambda b: b.clone(), base=None, **strategy):
    s = {"name": "diloco", "inner_steps": 6, "fragments": 2,
         "outer_optimizer": {"name": "sgd", "lr": 2.0, "momentum": 0.0, "nesterov": False}, **strategy}
    cfg = JobConfig.from_dict({**(base if base is not None else MOCKED), "strategy": s})
    return Trainer(cfg, Task(task_path, cfg.task_args), rank, world, "cpu", comm)


def order(t0, shares, n=3, **extra):
    return {"op": "round", "step": t0, "steps": n, "shares": list(shares), **extra}


def run_round(tr, t0, shares, n=3, **extra):
    report = tr.strategy.prepare(order(t0, shares, n, **extra))
    tr.commit()
    return report


def record(tr):
    """Records the parameters before each inner step (each replica.grads call), keyed
    by this replica's own count of inner steps, as torchft's test does."""
    history, real = {}, tr.replica.grads

    def grads(t, shares, totals=None):
        history[str(len(history))] = named(tr.replica.names, tr.replica.trainable)
        return real(t, shares, totals)
    tr.replica.grads = grads
    return history


def named(names, tensors):
    return {n: t.detach().tolist() for n, t in zip(names, tensors)}


def global_params(tr):
    s = tr.strategy
    return named(tr.replica.names, s.globals if s.globals is not None else tr.replica.trainable)


def oracle(name):
    """Per replica, its {"history", "global_parameter_history"} (some files wrap each
    replica's in a list of one)."""
    with open(os.path.join(ORACLES, f"{name}.json")) as f:
        return [r[0] if isinstance(r, list) else r for r in json.load(f)]


def same_as_oracle(got, want):
    """`got` (recorded as far as we ran) equals `want` over `want`'s extent, exactly."""
    last = max(int(k) for k in want)
    return {k: v for k, v in got.items() if int(k) <= last} == want


class Switch:
    """A Comm whose group can be swapped between phases (the ring re-forming)."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def world_size(self):
        return self.inner.world_size

    def allreduce(self, buf, codec="f32"):
        return self.inner.allreduce(buf, codec)

    def allgather(self, blob):
        return self.inner.allgather(blob)


class Lost:
    """A ring that lost a member: every collective is abandoned."""
    world_size = 2

    def allreduce(self, buf, codec="f32"):
        raise StepAborted()

    def allgather(self, blob):
        raise StepAborted()


class FailOnce(Switch):
    """Raises StepAborted at its `at`-th all-reduce (counting from 1), without joining it."""

    def __init__(self, inner, at):
        super().__init__(inner)
        self.calls, self.at = 0, at

    def allreduce(self, buf, codec="f32"):
        self.calls += 1
        if self.calls == self.at:
            raise StepAborted()
        return self.inner.allreduce(buf, codec)


# ---- torchft's histories ---------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_diloco_mocked_updates_match_torchft_bit_for_bit(tmp_path, case):
    tau, alpha = CASES[case]
    task = write(tmp_path, MOCKED_TASK)
    group = FakeGroup(2)
    trs = [diloco(task, r, 2, group.member(r), overlap_steps=tau, alpha=alpha) for r in range(2)]
    assert isinstance(trs[0].strategy, DiLoCo) and trs[0].strategy.fragments == [[0], [1]]

    def go(r):
        tr = trs[r]
        history, globs, reports = record(tr), {"0": global_params(tr)}, []
        for i in range(6):
            reports.append(run_round(tr, 3 * i, [1, 1], want_hash=True))
            globs[str(3 * (i + 1))] = global_params(tr)
        return history, globs, reports

    results = group.run(go)
    want = oracle(f"test_diloco_mocked_updates_{case}")
    for (history, globs, _), expected in zip(results, want):
        assert same_as_oracle(history, expected["history"])
        assert same_as_oracle(globs, expected["global_parameter_history"])
    reports = [rep for _, _, rep in results]
    assert [r["hash"] for r in reports[0]] == [r["hash"] for r in reports[1]]
    first = reports[0][0]
    assert first["fragment"] == 0 and reports[0][1]["fragment"] == 1
    # the loss 2 (w0 + w1) over steps 0-2: (4 - 4 - 12) / 3
    assert (first["samples"], first["loss"], first["dense_count"], first["skipped"]) == (3, -4.0, 1, False)
    assert first["outer_lr"] == 2.0 and first["lr"] == 1.0 and first["micro_batches"] == 3
    assert first["comm_s"] >= 0 and first["compute_s"] > 0 and first["hidden_s"] >= 0
    assert (first["hidden_s"] > 0) == (tau > 0)


def test_diloco_mocked_failure_recovery_matches_torchft(tmp_path):
    # Replica 1 trains round 0 and is lost in its all-reduce; replica 0 retries the round
    # alone (its inner steps kept) and goes on through step 9; replica 1 then takes
    # replica 0's whole state and both continue.
    task = write(tmp_path, MOCKED_TASK)
    comms = [Switch(Lost()), Switch(Lost())]
    trs = [diloco(task, r, 2, comms[r]) for r in range(2)]
    histories = [record(tr) for tr in trs]
    globs = [{"0": global_params(tr)} for tr in trs]
    for tr in trs:
        with pytest.raises(StepAborted):
            tr.strategy.prepare(order(0, [1, 1]))
        assert tr.next_step == 0 and tr.pending is None
    comms[0].inner = FakeGroup(1).member(0)
    run_round(trs[0], 0, [1, 0])  # the lost rank's share zeroed: the held round
    assert len(histories[0]) == 3  # its inner steps were not redone
    globs[0]["3"] = global_params(trs[0])
    for t0 in (3, 6):
        run_round(trs[0], t0, [2, 0])
        globs[0][str(t0 + 3)] = global_params(trs[0])
    pair = FakeGroup(2)
    for r in range(2):
        comms[r].inner = pair.member(r)
    hashes = pair.run(lambda r: trs[r].sync_state(0))
    assert hashes[0] == hashes[1] and trs[1].next_step == 9
    globs[1][str(len(histories[1]))] = global_params(trs[1])

    def go(r):
        for t0 in range(9, 24, 3):
            run_round(trs[r], t0, [1, 1])
            globs[r][str(len(histories[r]))] = global_params(trs[r])
    pair.run(go)
    for r, expected in enumerate(oracle("test_diloco_mocked_failure_recovery_0")):
        assert same_as_oracle(histories[r], expected["history"])
        assert same_as_oracle(globs[r], expected["global_parameter_history"])


# ---- weighting -------------------------------------------------------------------------
def two_ranks(task, shares, rounds=1, **strategy):
    group = FakeGroup(2)
    trs = [diloco(task, r, 2, group.member(r), base={**MOCKED, "batch_size": 4}, **strategy)
           for r in range(2)]

    def go(r):
        out = []
        for i in range(rounds):
            tr = trs[r]
            rep = tr.strategy.prepare(order(3 * i, shares))
            before = [g.clone() for g in tr.strategy.globals]
            pg = [g - p.detach() for g, p in zip(before, tr.replica.trainable)]
            tr.commit()
            out.append((rep, before, pg))
        return out
    return trs, group.run(go)


@pytest.mark.parametrize("shares", [[2, 2], [1, 3]])
def test_pseudo_gradients_are_averaged_weighted_by_share(tmp_path, shares):
    task = write(tmp_path, LINEAR_TASK)
    trs, out = two_ranks(task, shares, fragments=1, inner_steps=3)
    (rep0, before, pg0), (rep1, _, pg1) = out[0][0], out[1][0]
    w = [s / sum(shares) for s in shares]
    for g, b, a, c in zip(trs[0].strategy.globals, before, pg0, pg1):
        if shares[0] == shares[1]:  # equal shares: torchft's plain average, exactly
            assert torch.equal(g, b - 2.0 * ((a + c) / 2))
        else:
            assert torch.allclose(g, b - 2.0 * (w[0] * a + w[1] * c), rtol=1e-6, atol=0)
    assert (rep0["samples"], rep1["samples"]) == (3 * shares[0], 3 * shares[1])
    # Weighted by samples, the workers' local means make the whole batch's mean: the
    # same as one worker training on the whole batch.
    one = diloco(task, base={**MOCKED, "batch_size": 4}, fragments=1, inner_steps=3)
    run_round(one, 0, [4])
    for g, h in zip(trs[0].strategy.globals, one.strategy.globals):
        assert torch.allclose(g, h, rtol=1e-6, atol=0)
    assert torch.equal(trs[0].strategy.globals[0], trs[1].strategy.globals[0])


def test_a_worker_with_share_0_trains_nothing_and_weighs_nothing(tmp_path):
    task = write(tmp_path, LINEAR_TASK)
    trs, out = two_ranks(task, [4, 0], fragments=1, inner_steps=3)
    rep, _, pg = out[1][0]
    assert (rep["samples"], rep["loss"], rep["micro_batches"]) == (0, 0.0, 0)
    assert all(p.abs().sum() == 0 for p in pg)  # its local weights did not move
    assert trs[1].next_step == 3 and trs[1].replica.lr == 1.0
    one = diloco(task, base={**MOCKED, "batch_size": 4}, fragments=1, inner_steps=3)
    run_round(one, 0, [4])
    for a, b, c in zip(trs[0].strategy.globals, trs[1].strategy.globals, one.strategy.globals):
        assert torch.equal(a, b) and torch.equal(a, c)


# ---- config and fragments --------------------------------------------------------------
@pytest.mark.parametrize("strategy,field,text", [
    ({"inner_steps": 0}, "strategy.inner_steps", "must be at least 1"),
    ({"inner_steps": 6, "fragments": 4}, "strategy.inner_steps", "multiple of strategy.fragments (4)"),
    ({"inner_steps": 6, "fragments": 2, "overlap_steps": 3}, "strategy.overlap_steps", "less than"),
    ({"codec": "int3"}, "strategy.codec", "'int3' is not one of none, fp16, bf16, int8"),
    ({"alpha": 1.5}, "strategy.alpha", "in [0, 1]"),
    ({"outer_optimizer": {"name": "adam"}}, "strategy.outer_optimizer.name", "not one of sgd"),
    ({"outer_optimizer": {"lr": 0}}, "strategy.outer_optimizer.lr", "> 0"),
    ({"outer_optimizer": {"momentum": 1.0}}, "strategy.outer_optimizer.momentum", "[0, 1)"),
    ({"outer_optimizer": {"lr": "x"}}, "strategy.outer_optimizer.lr", "expected a finite number"),
    ({"outer_optimizer": 3}, "strategy.outer_optimizer", "expected a mapping"),
    ({"fragments": 3}, "strategy.fragments", "3 is more than the model's 2 top-level modules "
                                             "with trainable parameters (layers.0, layers.1)"),
])
def test_bad_diloco_settings_are_config_errors_naming_the_field(tmp_path, strategy, field, text):
    task = write(tmp_path, MOCKED_TASK)
    with pytest.raises(ConfigError) as err:
        diloco(task, **strategy)
    assert err.value.field == field and text in err.value.message


class Transformerish(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # on the root: goes with the first unit
        self.emb = nn.Embedding(100, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 50), "b": nn.Linear(8, 50)})
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_fragments_are_contiguous_runs_of_top_level_modules_balanced_by_size():
    model = Transformerish()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, numels = [n for n, _ in named], [p.numel() for _, p in named]
    # units: emb (+ scale) 801, blocks.0..3 72 each, heads.a 450, heads.b 450
    frags = partition(model, names, numels, 3)
    assert [[names[i] for i in f] for f in frags] == [
        ["scale", "emb.weight"],
        [f"blocks.{b}.{w}" for b in range(4) for w in ("weight", "bias")] + ["heads.a.weight", "heads.a.bias"],
        ["heads.b.weight", "heads.b.bias"]]
    assert sorted(i for f in frags for i in f) == list(range(len(names)))  # each exactly once
    assert len(partition(model, names, numels, 7)) == 7
    with pytest.raises(ConfigError, match="more than the model's 7 top-level modules"):
        partition(model, names, numels, 8)
    seq = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    names = [n for n, _ in seq.named_parameters()]
    assert partition(seq, names, [p.numel() for p in seq.parameters()], 2) == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError, match=r"2 top-level modules with trainable parameters \(0, 2\)"):
        partition(seq, names, [1, 1, 1, 1], 3)
    # the largest run as small as any contiguous split allows
    assert balanced_split([5, 1, 1, 1, 1, 1, 5], 3) == [0, 1, 6]
    assert balanced_split([1, 1, 1, 1], 4) == [0, 1, 2, 3]


# ---- aborts, retries, checkpoints, joiners ---------------------------------------------
BN_BASE = {**TINY_CONFIG, "batch_size": 8, "steps": 60, "prefetch": 0,
           "optimizer": {"name": "adam", "lr": 0.01}, "lr_schedule": {"name": "constant"}}
BN_STRATEGY = {"inner_steps": 6, "fragments": 2, "overlap_steps": 1, "alpha": 0.5, "codec": "int8",
               "outer_optimizer": {"name": "sgd", "lr": 0.7, "momentum": 0.9, "nesterov": True}}


def bn_pair(task, comms):
    return [diloco(task, r, 2, comms[r], base=BN_BASE, **BN_STRATEGY) for r in range(2)]


def everything(tr):
    """Every tensor of a replica and its strategy (local, inner, global, outer, memory)."""
    out = {"replica": tr.replica.state_dict(), "strategy": tr.strategy.state_dict(),
           "rank": tr.compressor.state_dict()}
    return [v for v in _leaves(out)]


def _leaves(x):
    if isinstance(x, torch.Tensor):
        yield x.detach().clone()  # state dicts hold live tensors
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            yield from _leaves(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


def equal_states(a, b):
    return _same(everything(a), everything(b))


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                    for x, y in zip(a, b))


def count_grads(tr):
    calls, real = [0], tr.replica.grads

    def grads(*args):
        calls[0] += 1
        return real(*args)
    tr.replica.grads = grads
    return calls


SHARES = [[3, 5], [8, 0], [4, 4], [2, 6], [5, 3], [6, 2]]  # BatchNorm: 0 or >= 2


def steady_run(task, rounds):
    group = FakeGroup(2)
    trs = bn_pair(task, [group.member(r) for r in range(2)])
    group.run(lambda r: [run_round(trs[r], 3 * i, SHARES[i]) for i in range(rounds)])
    return trs


def test_an_abort_leaves_no_trace_and_a_failed_all_reduce_costs_no_inner_steps(tmp_path):
    task = write(tmp_path, BN_TASK)
    steady = steady_run(task, 4)
    group = FakeGroup(2)
    # all-reduces: 2 per round (pseudo-gradient, BatchNorm buffers); round 1's fails once
    comms = [FailOnce(group.member(r), at=3) for r in range(2)]
    trs = bn_pair(task, comms)
    calls = [count_grads(tr) for tr in trs]

    def go(r):
        tr = trs[r]
        run_round(tr, 0, SHARES[0])
        start = everything(tr)
        with pytest.raises(StepAborted):  # the pseudo-gradient's all-reduce, overlapped
            tr.strategy.prepare(order(3, SHARES[1]))
        assert tr.pending is None and tr.next_step == 3 and _same(everything(tr), start)
        run_round(tr, 3, SHARES[1])  # held: only the all-reduce again
        assert calls[r][0] == 3 * sum(1 for s in SHARES[:2] if s[r])  # none for share 0
        # prepared, then aborted by the coordinator: back to the start, and held again
        start = everything(tr)
        report = tr.strategy.prepare(order(6, SHARES[2], want_hash=True))
        assert tr.abort() == 6 and tr.pending is None and tr.next_step == 6
        assert _same(everything(tr), start)
        again = run_round(tr, 6, SHARES[2], want_hash=True)
        assert calls[r][0] == 3 * sum(1 for s in SHARES[:3] if s[r]) and again["hash"] == report["hash"]
        run_round(tr, 9, SHARES[3])
        return report["hash"]
    hashes = group.run(go)
    assert hashes[0] == hashes[1]
    for tr, ref in zip(trs, steady):
        assert equal_states(tr, ref)


def test_a_held_round_is_dropped_when_the_next_order_is_another(tmp_path):
    task = write(tmp_path, BN_TASK)
    strategy = {**BN_STRATEGY, "codec": "none"}

    def failed_once():
        tr = diloco(task, base=BN_BASE, **strategy)
        calls = count_grads(tr)
        tr.comm.inner.fn = lambda b: (_ for _ in ()).throw(StepAborted())
        with pytest.raises(StepAborted):
            tr.strategy.prepare(order(0, [8]))
        tr.comm.inner.fn = lambda b: b.clone()
        return tr, calls

    ref = diloco(task, base=BN_BASE, **strategy)
    fresh = dict(ref.state("checkpoint"))
    run_round(ref, 0, [8])
    tr, calls = failed_once()  # a checkpoint loaded since: its inner steps are redone
    tr.load_state(fresh)
    run_round(tr, 0, [8])
    assert calls[0] == 6 and equal_states(tr, ref)
    tr, calls = failed_once()  # weights changed since (a sync): redone from them
    moved = diloco(task, base=BN_BASE, **strategy)
    moved.strategy.state_dict()  # its global parameters taken before the change, as tr's were
    for t in (tr, moved):
        with torch.no_grad():
            t.replica.trainable[0].add_(1.0)
    run_round(tr, 0, [8])
    run_round(moved, 0, [8])
    assert calls[0] == 6 and equal_states(tr, moved)
    tr, calls = failed_once()  # the same round: held
    run_round(tr, 0, [8])
    assert calls[0] == 3 and equal_states(tr, ref)


def test_checkpoint_resume_at_a_round_boundary_continues_exactly(tmp_path):
    task = write(tmp_path, BN_TASK)
    steady = steady_run(task, 6)
    group = FakeGroup(2)
    first = bn_pair(task, [group.member(r) for r in range(2)])
    group.run(lambda r: [run_round(first[r], 3 * i, SHARES[i]) for i in range(3)])
    files = dict(first[0].state("checkpoint"))  # the coordinator checkpoints rank 0 ...
    own = [dict(tr.state("compressor"))["compressor.pt"] for tr in first]  # ... and each rank's own
    assert list(files) == ["model.pt", "optimizer.pt", "schedule.pt", "data.json", "rng.pt",
                           "meta.json", "compressor.pt", "strategy.pt"]
    comp = torch.load(io.BytesIO(own[1]), weights_only=True)
    assert comp["rank"] == 1 and comp["state"]["method"] == "diloco" and set(comp["state"]["memory"]) == {0, 1}
    group = FakeGroup(2)
    resumed = bn_pair(task, [group.member(r) for r in range(2)])
    for r, tr in enumerate(resumed):
        assert tr.load_state({**files, "compressor.pt": own[r]}) == 9
    group.run(lambda r: [run_round(resumed[r], 3 * i, SHARES[i]) for i in range(3, 6)])
    for tr, ref in zip(resumed, steady):
        assert equal_states(tr, ref)
    # Without its own compressor.pt a rank starts from the checkpointed rank's local state.
    other = bn_pair(task, [lambda b: b, lambda b: b])[1]
    other.load_state(files)
    assert all(torch.equal(p, q) for p, q in zip(other.replica.trainable, first[0].replica.trainable))
    assert other.compressor.memory == {}


def test_evaluation_and_final_weights_use_the_global_parameters(tmp_path):
    task = write(tmp_path, MOCKED_TASK)
    tr = diloco(task, alpha=1.0)  # local weights kept: they differ from the global ones
    run_round(tr, 0, [2])
    glob, local = [g.clone() for g in tr.strategy.globals], [p.detach().clone() for p in tr.replica.trainable]
    assert not torch.equal(glob[0], local[0])
    with tr.strategy.evaluation_params():
        assert all(torch.equal(p, g) for p, g in zip(tr.replica.trainable, glob))
    assert all(torch.equal(p, q) for p, q in zip(tr.replica.trainable, local))
    assert tr.eval(0, 1, 1)[1]["w0"] == glob[0].item() == -11.0
    assert all(torch.equal(p, q) for p, q in zip(tr.replica.trainable, local))
    tensors, _ = safetensors.loads(dict(tr.state("final"))["model.safetensors"])
    assert torch.equal(tensors["layers.0.weight"], glob[0]) and torch.equal(tensors["layers.1.weight"], glob[1])
    assert all(torch.equal(p, q) for p, q in zip(tr.replica.trainable, local))


def test_rounds_on_the_worker_link(tmp_path):
    task = write(tmp_path, MOCKED_TASK)
    w = FakeProvider(tmp_path)
    strategy = {"name": "diloco", "inner_steps": 4, "fragments": 2, "overlap_steps": 1, "codec": "bf16",
                "outer_optimizer": {"name": "sgd", "lr": 2.0, "momentum": 0.0, "nesterov": False}}
    ready, _ = w.init(task, **{**MOCKED, "strategy": strategy, "lr_schedule": {"name": "constant"}})
    assert ready["op"] == "ready"
    w.request({"op": "sync"})
    done, _ = w.request({"op": "round", "step": 0, "steps": 2, "shares": [2], "want_hash": True})
    assert done["op"] == "round_done" and (done["step"], done["steps"], done["fragment"]) == (0, 2, 0)
    assert {"loss", "samples", "lr", "outer_lr", "compute_s", "comm_s", "hidden_s", "forward_backward_s",
            "micro_batches", "max_micro_batch", "dense_count", "skipped", "hash"} <= set(done)
    assert w.allreduces[-1]["codec"] == "bf16" and w.allreduces[-1]["count"] == 1
    nxt, _ = w.request({"op": "round", "step": 2, "steps": 2, "shares": [2], "want_hash": True,
                        "decision": {"step": 0, "verdict": "commit"}})
    assert nxt["fragment"] == 1 and nxt["hash"] != done["hash"]
    w.request({"op": "decide", "step": 2, "verdict": "commit"})
    h, _ = w.request({"op": "eval", "step": 4, "start": 0, "count": 1, "batch_size": 1})
    # global layers.0: 1 - 2 * (1 - (-1)) = -3 (its pseudo-gradient taken after 1 of 2 steps)
    assert h["op"] == "eval_done" and h["sums"]["w0"] == -3.0
    h, _ = w.request({"op": "round", "step": 1, "steps": 2, "shares": [2]})
    assert h["op"] == "error" and "a diloco round is 2 inner steps from a multiple of 2" in h["message"]
    assert w.proc.wait(timeout=30) == 3


def test_a_checkpoint_without_diloco_state_starts_the_global_parameters_from_its_weights(tmp_path):
    task = write(tmp_path, MOCKED_TASK)
    cfg = JobConfig.from_dict({**MOCKED, "compression": {"method": "none"}})
    sync = Trainer(cfg, Task(task, cfg.task_args), 0, 1, "cpu", lambda b: b.clone())
    for t in range(3):
        sync.step(t, [2])
    tr = diloco(task)
    run_round(tr, 0, [2])  # global parameters of its own, which the load must not keep
    assert tr.load_state(dict(sync.state("checkpoint"))) == 3
    assert tr.strategy.globals is None
    assert global_params(tr) == named(sync.replica.names, sync.replica.trainable)
    run_round(tr, 3, [2])
