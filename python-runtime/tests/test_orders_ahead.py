"""Orders ahead: a step applied before its decision, so the next starts at once, and put
back exactly when the coordinator aborts it (docs/protocol.md, "Orders ahead")."""

import pytest
import torch

from nimble_worker.link import LinkError
from test_train import trainer


def same_state(a, b):
    for p, q in zip(a.params, b.params):
        assert torch.equal(p, q)
    sa, sb = a.replica.optimizer.state_dict(), b.replica.optimizer.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, v in sa["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][k][key]))
    assert a.replica.lr == b.replica.lr and a.next_step == b.next_step


@pytest.mark.parametrize("optimizer", [{"name": "adam", "lr": 0.01}, {"name": "sgd", "lr": 0.05, "momentum": 0.9}])
def test_steps_applied_ahead_and_committed_match_steps_applied_in_turn(tiny_task, optimizer):
    ahead, steady = trainer(tiny_task, optimizer=optimizer), trainer(tiny_task, optimizer=optimizer)
    ahead.prepare(0, [8])
    for t in range(1, 6):
        ahead.prepare(t, [8], ahead=True)  # applies t-1 before its decision
        assert ahead.strategy.pending == t - 1
        ahead.strategy.decide(t - 1, "commit")
        assert ahead.strategy.pending == t
    ahead.strategy.decide(5, "commit")
    for t in range(6):
        steady.step(t, [8])
    same_state(ahead, steady)


@pytest.mark.parametrize("first", [0, 3])
def test_aborting_a_step_applied_ahead_aborts_the_next_and_restores_it_bit_for_bit(tiny_task, first):
    # first = 0: the optimizer had no state before the step (its moments appear with it).
    ahead, steady = trainer(tiny_task), trainer(tiny_task)
    for t in range(first):
        ahead.step(t, [8])
        steady.step(t, [8])
    ahead.prepare(first, [8])
    ahead.prepare(first + 1, [8], ahead=True)
    assert ahead.next_step == first + 1  # applied ahead
    ahead.strategy.decide(first, "abort")
    assert ahead.strategy.pending is None
    same_state(ahead, steady)
    for t in range(first, first + 3):  # redone, as after a recovery
        ahead.step(t, [8])
        steady.step(t, [8])
    same_state(ahead, steady)


def test_aborting_only_the_later_step_keeps_the_one_applied_ahead(tiny_task):
    ahead, steady = trainer(tiny_task), trainer(tiny_task)
    ahead.prepare(0, [8])
    ahead.prepare(1, [8], ahead=True)
    ahead.strategy.decide(1, "abort")
    assert ahead.strategy.pending == 0
    ahead.strategy.decide(0, "commit")
    steady.step(0, [8])
    same_state(ahead, steady)


def test_at_most_two_steps_are_undecided(tiny_task):
    tr = trainer(tiny_task)
    tr.prepare(0, [8])
    tr.prepare(1, [8], ahead=True)
    with pytest.raises(LinkError, match="at most two"):
        tr.prepare(2, [8], ahead=True)
    with pytest.raises(LinkError, match="step 0 is the one applied ahead"):
        tr.strategy.decide(2, "commit")
