import torch

from nimble_worker.data import GlobalSampler


def slices(sampler, t, shares):
    return [sampler.indices(t, shares, r) for r in range(len(shares))]


def test_union_of_worker_slices_is_the_one_worker_batch():
    s = GlobalSampler(n=100, batch_size=32, seed=7)
    for t in range(8):  # crosses epoch boundaries (100 is not a multiple of 32)
        one = s.indices(t, [32], 0)
        parts = slices(GlobalSampler(100, 32, 7), t, [1, 7, 24])
        assert [len(p) for p in parts] == [1, 7, 24]
        assert sum(parts, []) == one


def test_step_is_independent_of_split_and_history():
    a, b = GlobalSampler(50, 10, 1), GlobalSampler(50, 10, 1)
    for t in range(12):
        a.indices(t, [10], 0)
    for shares in ([10], [5, 5], [0, 3, 7], [2, 0, 0, 8]):
        got = sum(slices(b, 11, shares), [])
        assert got == a.indices(11, [10], 0)  # b jumped straight to step 11
    assert GlobalSampler(50, 10, 2).indices(11, [10], 0) != a.indices(11, [10], 0)


def test_epochs_wrap_and_each_epoch_is_a_permutation():
    n, B = 10, 4
    s = GlobalSampler(n, B, seed=0)
    stream = sum((s.indices(t, [1, 3], 0) + s.indices(t, [1, 3], 1) for t in range(10)), [])
    assert len(stream) == 40
    for e in range(4):
        epoch = stream[e * n:(e + 1) * n]
        assert sorted(epoch) == list(range(n))
        assert epoch == s.perm(e).tolist()
    assert stream[:n] != stream[n:2 * n]  # a fresh permutation each epoch
    # step 2 covers positions 8..11: end of epoch 0, start of epoch 1
    assert s.indices(2, [4], 0) == s.perm(0).tolist()[8:] + s.perm(1).tolist()[:2]


def test_permutation_matches_the_documented_recipe():
    from nimble_worker.data import derive_seed
    s = GlobalSampler(37, 5, seed=11)
    g = torch.Generator().manual_seed(derive_seed("epoch", 11, 3))
    assert s.perm(3).tolist() == torch.randperm(37, generator=g).tolist()
