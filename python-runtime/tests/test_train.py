import threading

import pytest
import torch

from conftest import TINY_CONFIG
from nimble_worker.config import JobConfig
from nimble_worker.task import Task
from nimble_worker.optim import lr_factor
from nimble_worker.tensors import flat_cpu
from nimble_worker.train import Trainer


def trainer(task_path, rank=0, world=1, allreduce=lambda b: b.clone(), max_micro_batch=None,
            speed=1.0, **over):
    cfg = JobConfig.from_dict({**TINY_CONFIG, **over})
    return Trainer(cfg, Task(task_path, cfg.task_args), rank, world, "cpu", allreduce,
                   max_micro_batch=max_micro_batch, speed=speed)


def backward(tr, t, shares):
    """(loss, flat gradient) of this replica's share of step t."""
    loss, grads = tr.replica.grads(t, shares)
    return loss, flat_cpu(grads)


def test_config_defaults_and_extra_keys():
    cfg = JobConfig.from_dict({"name": "x", "task": "t.py", "steps": 5, "batch_size": 4,
                               "optimizer": {"name": "adam"}, "providers": ["a"], "output": "o"})
    assert cfg.seed == 0 and cfg.optimizer.lr == 0.01 and cfg.optimizer.betas == (0.9, 0.999)
    assert cfg.optimizer.eps == 1e-8 and cfg.lr_schedule.name == "constant"
    assert (cfg.eval.every, cfg.eval.samples, cfg.eval.batch_size) == (0, 1000, 256)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep) == (0, 3)


def test_warmup_cosine_schedule():
    cfg = JobConfig.from_dict({"steps": 100, "optimizer": {"lr": 0.1},
                               "lr_schedule": {"name": "warmup_cosine", "warmup_steps": 10,
                                               "min_lr": 0.01}})
    f = lr_factor(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_scaled_gradients_of_workers_sum_to_the_global_gradient(tiny_task):
    shares = [1, 7, 0, 24]
    one = trainer(tiny_task, batch_size=32)
    for t in (0, 3):  # step 3 wraps into epoch 1 of the 50-item dataset
        loss1, g1 = backward(one, t, [32])
        parts = [backward(trainer(tiny_task, rank=r, world=4, batch_size=32), t, shares)
                 for r in range(4)]
        assert parts[2][1].abs().sum() == 0 and parts[2][0] == 0.0
        assert torch.allclose(sum(g for _, g in parts), g1, atol=1e-6)
        mean = sum(l * s for (l, _), s in zip(parts, shares)) / 32
        assert mean == pytest.approx(loss1, abs=1e-5)


class ThreadRing:
    """An in-process all-reduce for N threads (a barrier and a shared sum)."""

    def __init__(self, n):
        self.n, self.bufs, self.lock = n, {}, threading.Lock()
        self.barrier = threading.Barrier(n)

    def member(self, rank):
        def allreduce(buf):
            with self.lock:
                self.bufs[rank] = buf.clone()
            self.barrier.wait()
            out = sum(self.bufs[r] for r in range(self.n))  # same order on every rank
            self.barrier.wait()
            return out
        return allreduce


def test_three_workers_match_one_worker(tiny_task):
    steps, B = 6, 12
    ref = trainer(tiny_task, batch_size=B)
    ref.sync()
    for t in range(steps):
        ref.step(t, [B])
    ring = ThreadRing(3)
    trs = [trainer(tiny_task, rank=r, world=3, allreduce=ring.member(r), batch_size=B)
           for r in range(3)]
    with torch.no_grad():  # rank 1 and 2 start from different weights: sync must fix it
        for p in trs[1].params + trs[2].params:
            p.add_(1.0)
    shares = [[2, 3, 7], [12, 0, 0], [0, 6, 6], [4, 4, 4], [1, 1, 10], [11, 1, 0]]
    reports = [[] for _ in range(3)]

    def run(r):
        reports[r].append(trs[r].sync())
        for t in range(steps):
            reports[r].append(trs[r].step(t, shares[t], want_hash=True))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert len({rep[0] for rep in reports}) == 1  # same synced hash
    assert len({rep[-1]["hash"] for rep in reports}) == 1  # replicas identical
    for p, q in zip(trs[0].params, ref.params):
        assert torch.allclose(p, q, atol=1e-5)
    assert reports[1][2]["samples"] == 0 and reports[1][2]["loss"] == 0.0


def test_eval_sums_cover_disjoint_slices(tiny_task):
    tr = trainer(tiny_task)
    n_all, all_sums, all_counts = tr.eval(0, 20, 7)
    n_a, a, a_counts = tr.eval(0, 9, 4)
    n_b, b, b_counts = tr.eval(9, 100, 5)  # clipped to the 20 validation items
    assert (n_all, n_a, n_b) == (20, 9, 11)
    for k in all_sums:
        assert a[k] + b[k] == pytest.approx(all_sums[k], abs=1e-4)
        assert (a_counts[k], b_counts[k], all_counts[k]) == (9, 11, 20)  # batch means count items
    assert tr.model.training


def test_micro_batches_accumulate_the_one_batch_gradient(tiny_task):
    whole = trainer(tiny_task, batch_size=24)
    micro = trainer(tiny_task, batch_size=24, max_micro_batch=5)
    for t in (0, 2):  # step 2 wraps into epoch 1 of the 50-item dataset
        loss1, g1 = backward(whole, t, [24])
        assert whole.replica.micro_batches == 1
        loss5, g5 = backward(micro, t, [24])
        assert micro.replica.micro_batches == 5  # 5 + 5 + 5 + 5 + 4
        assert torch.allclose(g5, g1, atol=1e-6, rtol=0)
        assert loss5 == pytest.approx(loss1, abs=1e-6)
    rep = micro.step(3, [24])
    assert rep["micro_batches"] == 5 and rep["samples"] == 24
    assert trainer(tiny_task, batch_size=24, max_micro_batch=24).step(0, [24])["micro_batches"] == 1
    split = trainer(tiny_task, rank=1, world=2, batch_size=24, max_micro_batch=5)
    assert split.step(0, [24, 0])["micro_batches"] == 0  # share 0: nothing to compute
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_micro_batch"):
            trainer(tiny_task, max_micro_batch=bad)


def test_speed_stretches_compute_time(tiny_task):
    # No prefetch: its thread would share the GIL with the timed steps, and its loading is
    # not stretched (a slower device does not slow the host's CPU).
    tr = trainer(tiny_task, batch_size=256, compression={"method": "none"}, prefetch=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # less scheduling noise on a busy host
    try:
        tr.step(0, [256])  # warm-up

        def compute(start):  # the least disturbed of 5 steps
            return min(tr.step(t, [256])["compute_s"] for t in range(start, start + 5))

        fast = compute(1)
        tr.set_speed(0.25)  # takes effect on the next step
        slow = compute(6)
    finally:
        torch.set_num_threads(threads)
    assert slow > 2.5 * fast, (fast, slow)
    tr.set_speed(1)
    assert tr.replica.speed.speed == 1.0
    for bad in (0, -0.5, 1.5, "fast", None):
        with pytest.raises(ValueError, match="speed"):
            tr.set_speed(bad)
    with pytest.raises(ValueError, match="speed"):
        trainer(tiny_task, speed=2.0)


def test_running_out_of_memory_halves_the_micro_batch_and_keeps_the_update(tmp_path):
    # A task whose "device" holds at most 7 samples at once: larger micro-batches raise the
    # error CUDA raises, after part of the backward work, as a real allocator would.
    from conftest import TINY_TASK
    path = tmp_path / "small_memory.py"
    path.write_text(TINY_TASK + '''
_compute_loss = compute_loss
def compute_loss(model, batch):
    if len(batch["x"]) > 7:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return _compute_loss(model, batch)
''')
    whole = trainer(tiny_task_path := str(path), batch_size=24, max_micro_batch=None)
    assert whole.replica.max_micro_batch is None
    reference = trainer(tiny_task_path, batch_size=24, max_micro_batch=6)
    rep = whole.step(0, [24])
    ref = reference.step(0, [24])
    # 24 -> 12 -> 6: the share is redone in micro-batches of 6, and the cap stays.
    assert rep["max_micro_batch"] == 6 and whole.replica.memory_caps == [(0, 12), (0, 6)]
    assert rep["micro_batches"] == 4 and rep["loss"] == pytest.approx(ref["loss"], abs=1e-6)
    for p, q in zip(whole.params, reference.params):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    assert whole.step(1, [24])["micro_batches"] == 4 and whole.replica.memory_caps == [(0, 12), (0, 6)]


def test_errors_other_than_out_of_memory_are_not_retried(tmp_path):
    from conftest import TINY_TASK
    path = tmp_path / "broken.py"
    path.write_text(TINY_TASK + '''
def compute_loss(model, batch):
    raise RuntimeError("shape mismatch")
''')
    tr = trainer(str(path), batch_size=8)
    from nimble_worker.task import TaskError
    with pytest.raises(TaskError, match="shape mismatch"):
        tr.step(0, [8])
    assert tr.replica.memory_caps == [] and tr.replica.max_micro_batch is None


@pytest.mark.parametrize("method", ["powersgd", "topk", "none"])
def test_an_aborted_step_leaves_no_trace_and_its_redo_matches_an_uninterrupted_run(tiny_task, method):
    from nimble_worker.comm import StepAborted
    calls = {"n": 0, "fail_at": -1}

    def allreduce(buf):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise StepAborted()
        return buf.clone()

    comp = {"method": method, **({"start_step": 1} if method != "none" else {})}
    if method == "powersgd":
        comp["rank"] = 1
    interrupted = trainer(tiny_task, allreduce=allreduce, compression=comp)
    steady = trainer(tiny_task, compression=comp)
    for t in range(3):
        interrupted.step(t, [8])
        steady.step(t, [8])
    # Abandoned inside its collectives (top-k all-gathers: its only collective fails) ...
    calls["fail_at"] = calls["n"] + (1 if method == "topk" else 2 if method == "powersgd" else 1)
    if method == "topk":
        interrupted.comm.inner.allgather = lambda blob: (_ for _ in ()).throw(StepAborted())
    with pytest.raises(StepAborted):
        interrupted.prepare(3, [8])
    assert interrupted.pending is None and interrupted.next_step == 3
    if method == "topk":
        del interrupted.comm.inner.allgather
    # ... and abandoned after reducing, before the coordinator committed it.
    report = interrupted.prepare(3, [8], want_hash=True)
    assert report["hash"] == interrupted.hash()  # nothing applied yet
    assert interrupted.abort() == 3 and interrupted.abort() is None
    assert interrupted.next_step == 3
    for t in (3, 4):
        interrupted.step(t, [8])
        steady.step(t, [8])
    for p, q in zip(interrupted.params, steady.params):
        assert torch.equal(p, q)
    a, b = interrupted.compressor.state_dict(), steady.compressor.state_dict()
    for key in ("memory", "q"):
        if isinstance(a.get(key), dict):
            assert a[key].keys() == b[key].keys()
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        elif a.get(key) is not None:
            assert torch.equal(a[key], b[key])


def test_a_prepared_step_must_be_committed_or_aborted_before_the_next(tiny_task):
    tr = trainer(tiny_task)
    tr.prepare(0, [8])
    with pytest.raises(RuntimeError, match="neither committed nor aborted"):
        tr.prepare(1, [8])
    tr.commit()
    assert tr.next_step == 1 and tr.prepare(1, [8])["step"] == 1


def test_a_joining_replica_takes_a_peers_whole_state_over_one_all_gather(tiny_task):
    from nimble_worker.compress.fake import FakeGroup
    comp = {"method": "powersgd", "rank": 1, "start_step": 1}
    trained = trainer(tiny_task, compression=comp)
    for t in range(4):
        trained.step(t, [8])
    group = FakeGroup(2)
    source = trainer(tiny_task, rank=0, world=2, allreduce=group.member(0), compression=comp)
    joiner = trainer(tiny_task, rank=1, world=2, allreduce=group.member(1), compression=comp)
    source.load_blob(trained.state_blob())
    assert source.next_step == 4 and source.hash() == trained.hash()
    assert joiner.hash() != source.hash()
    hashes = group.run(lambda r: [source, joiner][r].sync_state(0))
    assert hashes == [trained.hash()] * 2
    assert joiner.next_step == 4
    assert joiner.optimizer.state_dict()["state"].keys() == trained.optimizer.state_dict()["state"].keys()
    # The shared compressor state (Q's) comes along; the joiner's memories start empty.
    assert all(torch.equal(joiner.compressor.q[k], trained.compressor.q[k]) for k in trained.compressor.q)
    assert joiner.compressor.memory == {}
    # From here the two replicas step in lockstep.
    group.run(lambda r: [source, joiner][r].step(4, [5, 3]))
    assert source.hash() == joiner.hash()
