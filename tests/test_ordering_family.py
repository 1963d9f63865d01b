"""The paper's ordering family through the public API: herding, greedy, recursive, recursive-pair,
projections, the randomized sign rule, micro-batch units, memory refusal and checkpoints."""

import numpy as np
import pytest
import torch
from conftest import feed_epoch, is_permutation, save_load
from hypothesis import given, settings
from hypothesis import strategies as st
from torchgrab import (
    GraBSampler,
    MemoryLimitError,
    ShapeError,
    StateDictError,
    UnitIndexError,
    UnsupportedInputError,
    herding_discrepancy,
    orderings,
)

FAMILY = ["recursive", "recursive-pair", "herding", "greedy"]
EVERY = ["rr", "so", "flipflop", "fixed", "grab", "pair"] + FAMILY


def test_names_are_listed():
    assert set(FAMILY) <= set(orderings())


def test_herding_hand_computed():
    # d = 1, g = [3, 1, -1, -3, 4], identity first epoch. Mean 0.8, z = [2.2, 0.2, -1.8, -3.8, 3.2].
    # Signs over 0..4: + (s=2.2), <2.2,0.2> > 0 -> - (s=2.0), <2,-1.8> < 0 -> + (s=0.2),
    # <0.2,-3.8> < 0 -> + (s=-3.6), <-3.6,3.2> < 0 -> + => front [0, 2, 3, 4], back [1].
    g = np.array([[3.0], [1.0], [-1.0], [-3.0], [4.0]])
    s = GraBSampler(n=5, ordering="herding", first_epoch="identity", dtype=torch.float64)
    assert feed_epoch(s, g, per_step=2) == [0, 1, 2, 3, 4]
    assert list(s) == [0, 2, 3, 4, 1]


def test_greedy_hand_computed():
    # d = 1, g = [5, 1, -2, -4] (mean 0). Keys ||S + z||^2 - ||S||^2 = 2 S z + z^2:
    # S=0 -> unit 1 (1); S=1 -> 2: 0 vs 0: 35, 3: 8 -> unit 2; S=-1 -> 0: 15, 3: 24 -> unit 0; then 3.
    g = np.array([[5.0], [1.0], [-2.0], [-4.0]])
    s = GraBSampler(n=4, ordering="greedy", first_epoch="identity")
    feed_epoch(s, g, per_step=3)
    assert list(s) == [1, 2, 0, 3]


def test_recursive_hand_computed():
    # Same arithmetic as src/family_tests.rs: depth 1, g = [2, 1, 1, -1, -3] -> [0, 3, 1, 4, 2].
    g = np.array([[2.0], [1.0], [1.0], [-1.0], [-3.0]])
    s = GraBSampler(n=5, ordering="recursive", depth=1, first_epoch="identity")
    feed_epoch(s, g, per_step=2)
    assert list(s) == [0, 3, 1, 4, 2]


def test_recursive_pair_hand_computed():
    # Same arithmetic as src/family_tests.rs: depth 1 -> [0, 1, 5, 4, 8, 6, 7, 2, 3].
    g = np.array([[3.0], [1.0], [0.0], [1.0], [4.0], [-1.0], [2.0], [2.0], [5.0]])
    s = GraBSampler(n=9, ordering="recursive-pair", depth=1, first_epoch="identity")
    feed_epoch(s, g, per_step=4)
    assert list(s) == [0, 1, 5, 4, 8, 6, 7, 2, 3]


@pytest.mark.parametrize("base,rec", [("grab", "recursive"), ("pair", "recursive-pair")])
@pytest.mark.parametrize("balance", ["deterministic", "random"])
def test_depth_zero_equals_the_flat_balance_exactly(base, rec, balance):
    v = np.random.default_rng(0).normal(size=(53, 7)).astype(np.float32) + 0.3
    a = GraBSampler(n=53, ordering=base, seed=3, balance=balance)
    b = GraBSampler(n=53, ordering=rec, depth=0, seed=3, balance=balance)
    for epoch in range(4):
        limit = 30 if epoch == 2 else None
        assert feed_epoch(a, v, per_step=5, limit=limit) == feed_epoch(b, v, per_step=5, limit=limit)


@pytest.mark.parametrize("ordering", ["grab", "pair", "recursive", "recursive-pair", "herding", "greedy"])
def test_identity_projection_equals_no_projection(ordering):
    v = np.random.default_rng(1).normal(size=(40, 6)) + 0.5
    a = GraBSampler(n=40, ordering=ordering, seed=2, dtype=torch.float64)
    b = GraBSampler(n=40, ordering=ordering, seed=2, dtype=torch.float64, projection=("identity", 6))
    for _ in range(3):
        assert feed_epoch(a, v, per_step=4) == feed_epoch(b, v, per_step=4)


def test_projection_shrinks_the_state():
    v = np.random.default_rng(2).normal(size=(50, 400)).astype(np.float32)
    full = GraBSampler(n=50, ordering="herding")
    small = GraBSampler(n=50, ordering="herding", projection=("sparse", 16))
    feed_epoch(full, v, per_step=10)
    feed_epoch(small, v, per_step=10)
    assert full.state_bytes > small.state_bytes
    assert is_permutation(list(small), 50)


@pytest.mark.parametrize("ordering", ["grab", "pair", "recursive", "recursive-pair", "herding"])
def test_random_signs_reproducible_and_restored(ordering):
    v = np.random.default_rng(4).normal(size=(33, 5))

    def make(seed):
        return GraBSampler(n=33, ordering=ordering, seed=seed, balance="random", depth=2)

    a, b, c = make(7), make(7), make(8)
    orders_a = [feed_epoch(a, v, per_step=4) for _ in range(3)]
    assert orders_a == [feed_epoch(b, v, per_step=4) for _ in range(3)]
    assert orders_a != [feed_epoch(c, v, per_step=4) for _ in range(3)]
    # Mid-epoch checkpoint: the restored sampler continues with the same random signs.
    it = iter(a)
    first = [next(it) for _ in range(13)]
    a.step(v[first])
    state = save_load(a.state_dict())
    rest = list(it)
    a.step(v[rest])
    r = make(7)
    r.load_state_dict(state)
    assert list(r) == rest
    r.step(v[rest])
    assert feed_epoch(a, v, per_step=4) == feed_epoch(r, v, per_step=4)


def test_greedy_refuses_random_signs():
    with pytest.raises(StateDictError, match="greedy"):
        GraBSampler(n=4, ordering="greedy", balance="random")


def test_greedy_memory_refusal_names_the_bytes_and_changes_nothing():
    s = GraBSampler(n=1000, ordering="greedy", max_memory=10_000)
    it = iter(s)
    idx = [next(it) for _ in range(4)]
    before = s.state_dict()
    # Store 1000 x 100 x 4 = 400,000 bytes; scan 1000 x (100 x 8 + 12) = 812,000; total 1,212,000.
    with pytest.raises(MemoryLimitError, match=r"1212000 bytes"):
        s.step(np.ones((4, 100), dtype=np.float32))
    assert s.pending == 4 and idx
    after = s.state_dict()
    assert after["native"]["balance"] is None and before["native"]["balance"] is None


@pytest.mark.parametrize("ordering", FAMILY + ["grab"])
@pytest.mark.parametrize("projection", [None, ("gaussian", 3)])
def test_state_dict_round_trip_at_boundary_and_mid_epoch(ordering, projection):
    v = np.random.default_rng(5).normal(size=(29, 6)).astype(np.float32)
    kw = dict(n=29, ordering=ordering, seed=1, depth=2, rounds=2, projection=projection)
    a = GraBSampler(**kw)
    feed_epoch(a, v, per_step=4)
    b = GraBSampler(**kw)
    b.load_state_dict(save_load(a.state_dict()))
    assert feed_epoch(a, v, per_step=4) == feed_epoch(b, v, per_step=4)
    it = iter(a)
    first = [next(it) for _ in range(11)]
    a.step(v[first])
    c = GraBSampler(**kw)
    c.load_state_dict(save_load(a.state_dict()))
    rest = list(it)
    a.step(v[rest])
    assert list(c) == rest
    c.step(v[rest])
    assert feed_epoch(a, v, per_step=3) == feed_epoch(c, v, per_step=3)


def test_state_of_another_depth_is_refused():
    v = np.random.default_rng(6).normal(size=(10, 2))
    a = GraBSampler(n=10, ordering="recursive", depth=2)
    feed_epoch(a, v, per_step=3)
    state = a.state_dict()
    state["native"]["depth"] = 3
    with pytest.raises(StateDictError):
        GraBSampler(n=10, ordering="recursive", depth=3).load_state_dict(state)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 30),
    d=st.integers(1, 5),
    per_step=st.integers(1, 6),
    ordering=st.sampled_from(EVERY),
    unit_size=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    limit=st.integers(0, 35),
)
def test_every_ordering_permutes_under_early_break_and_units(n, d, per_step, ordering, unit_size, seed, limit):
    v = np.random.default_rng(seed).normal(size=(n, d)) + 0.5
    s = GraBSampler(n=n, ordering=ordering, seed=seed, depth=2, unit_size=unit_size)
    t = GraBSampler(n=n, ordering=ordering, seed=seed, depth=2, unit_size=unit_size)
    for _ in range(2):
        o = feed_epoch(s, v, per_step=per_step)
        assert len(s) == n and is_permutation(o, n)
        assert o == feed_epoch(t, v, per_step=1)  # batching does not matter, even across units
    feed_epoch(s, v, per_step=per_step, limit=limit)  # an early break, possibly mid-unit
    assert is_permutation(list(s), n)
    if unit_size > 1:
        order = list(s)
        # Units stay whole and contiguous in every order.
        units = [i // unit_size for i in order]
        runs = [u for k, u in enumerate(units) if k == 0 or units[k - 1] != u]
        assert len(runs) == len(set(runs))


def test_drop_last_with_a_dataloader_keeps_orders_permutations():
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(23, 3)
    ds = TensorDataset(x, torch.arange(23))
    for ordering in FAMILY:
        s = GraBSampler(ds, ordering=ordering, seed=0, unit_size=2)
        for _ in range(3):
            seen = []
            for xb, ib in DataLoader(ds, batch_size=5, sampler=s, drop_last=True):
                s.step(xb)
                seen += ib.tolist()
            assert len(seen) == 20
        assert is_permutation(list(s), 23)


def test_units_average_per_example_rows_and_accept_per_unit_rows():
    # n = 7, unit_size = 3: units {0,1,2}, {3,4,5}, {6}. Feeding each example the vector of its unit
    # (so the per-unit mean is that vector) must give the same orders as feeding one row per unit.
    unit_vec = np.array([[1.0, 0.0], [-2.0, 1.0], [0.5, 0.5]])
    ex = unit_vec[np.arange(7) // 3] + np.array([[0.1, 0], [0, 0], [-0.1, 0], [0, 0.2], [0, -0.2], [0, 0], [0, 0]])
    a = GraBSampler(n=7, ordering="grab", unit_size=3, first_epoch="identity", dtype=torch.float64)
    b = GraBSampler(n=7, ordering="grab", unit_size=3, first_epoch="identity", dtype=torch.float64)
    for _ in range(3):
        oa = feed_epoch(a, ex, per_step=2)  # units straddle steps: averaged through the carry
        ob = list(b)
        assert oa == ob
        units = [oa[0] // 3] + [i // 3 for k, i in enumerate(oa[1:], 1) if oa[k - 1] // 3 != i // 3]
        b.step(unit_vec[units], per_unit=True)


def test_unit_carry_survives_a_checkpoint():
    v = np.random.default_rng(8).normal(size=(20, 3))
    a = GraBSampler(n=20, ordering="pair", unit_size=4, seed=2)
    feed_epoch(a, v, per_step=3)
    it = iter(a)
    first = [next(it) for _ in range(6)]  # one and a half units
    a.step(torch.from_numpy(v[first]))
    state = save_load(a.state_dict())
    assert state["unit_carry"]["count"] == 2
    rest = list(it)
    a.step(torch.from_numpy(v[rest]))
    b = GraBSampler(n=20, ordering="pair", unit_size=4, seed=2)
    b.load_state_dict(state)
    rest_b = list(b)
    assert rest_b == rest
    b.step(torch.from_numpy(v[rest_b]))
    assert list(a) == list(b)


def test_explicit_indices_must_cover_whole_units():
    s = GraBSampler(n=8, ordering="grab", unit_size=2)
    list(s)
    with pytest.raises(UnitIndexError):
        s.step(np.ones((3, 2)), indices=[0, 1, 2])
    s.step(np.ones((4, 2)), indices=[3, 2, 0, 1])


def test_herding_and_greedy_beat_random_reshuffling():
    v = np.random.default_rng(9).normal(size=(400, 8)) + 1.0
    disc = {}
    for ordering in ["rr", "grab", "herding", "greedy"]:
        s = GraBSampler(n=400, ordering=ordering, seed=0, dtype=torch.float64)
        for _ in range(3):
            feed_epoch(s, v, per_step=16)
        disc[ordering] = herding_discrepancy(v, list(s)).linf
    assert disc["greedy"] < disc["rr"] / 3 and disc["herding"] < disc["rr"] / 3 and disc["grab"] < disc["rr"]


def test_a_unit_cut_by_skip_gets_no_gradient():
    # n = 6, unit_size = 3, identity first epoch: units {0,1,2} and {3,4,5}. Skipping example 0 cuts
    # unit 0; its other two rows are discarded, so only unit 1 is balanced (+1, front) and unit 0,
    # unseen, goes after it in the middle: next order [3, 4, 5, 0, 1, 2].
    s = GraBSampler(n=6, ordering="grab", unit_size=3, first_epoch="identity")
    assert list(s) == [0, 1, 2, 3, 4, 5]
    s.skip(1)
    s.step(np.ones((5, 2)))
    assert s.pending == 0
    assert list(s) == [3, 4, 5, 0, 1, 2]


def test_per_unit_rows_need_their_examples_yielded():
    s = GraBSampler(n=6, ordering="grab", unit_size=3)
    it = iter(s)
    [next(it) for _ in range(4)]
    with pytest.raises(ShapeError):
        s.step(np.ones((2, 2)), per_unit=True)  # the second unit has only 1 of 3 examples yielded
    s.step(np.ones((1, 2)), per_unit=True)
    assert s.pending == 1


@pytest.mark.parametrize("ordering", ["recursive", "recursive-pair"])
def test_depth_none_is_the_orderings_documented_default(ordering):
    import pickle

    from torchgrab.sampler import DEFAULT_DEPTH

    # docs/orderings.md, "Choosing depth" (benchmarks/depth.py): depth 1 for both tree orderings.
    assert DEFAULT_DEPTH == {"recursive": 1, "recursive-pair": 1}
    v = np.random.default_rng(10).normal(size=(37, 4)) + 0.2
    default = GraBSampler(n=37, ordering=ordering, seed=4)
    same = GraBSampler(n=37, ordering=ordering, seed=4, depth=DEFAULT_DEPTH[ordering])
    other = GraBSampler(n=37, ordering=ordering, seed=4, depth=5)  # the old shared default, still honoured
    assert default.state_dict()["native"]["depth"] == DEFAULT_DEPTH[ordering]
    assert other.state_dict()["native"]["depth"] == 5
    orders = [(feed_epoch(default, v, per_step=6), feed_epoch(same, v, per_step=6)) for _ in range(3)]
    assert all(a == b for a, b in orders)
    assert list(default) == list(same)
    for _ in range(3):
        feed_epoch(other, v, per_step=6)
    assert list(other) != list(default)  # an explicit depth is used as given
    # The depth travels in the native state: a checkpoint and a pickle keep it.
    restored = GraBSampler(n=37, ordering=ordering, seed=4)
    restored.load_state_dict(save_load(other.state_dict()))
    assert restored.state_dict()["native"]["depth"] == 5 and list(restored) == list(other)
    clone = pickle.loads(pickle.dumps(default))
    assert clone.state_dict()["native"]["depth"] == DEFAULT_DEPTH[ordering] and list(clone) == list(default)


def test_depth_default_leaves_other_orderings_and_validation_alone():
    # Orderings without a tree keep passing the native default (their state dicts are unchanged).
    for ordering in ("grab", "pair", "rr"):
        assert GraBSampler(n=5, ordering=ordering).state_dict()["native"]["depth"] == 5
    for bad in (-1, True, 2.0):
        with pytest.raises(UnsupportedInputError, match="depth"):
            GraBSampler(n=5, ordering="recursive", depth=bad)


@pytest.mark.parametrize("ordering", ["recursive", "recursive-pair"])
def test_an_explicit_depth_other_than_the_checkpoints_is_refused_and_changes_nothing(ordering):
    v = np.random.default_rng(11).normal(size=(20, 3)) + 0.3
    saved = GraBSampler(n=20, ordering=ordering, seed=2, depth=3)
    feed_epoch(saved, v, per_step=4)
    state = save_load(saved.state_dict())
    target = GraBSampler(n=20, ordering=ordering, seed=2, depth=2)
    feed_epoch(target, v, per_step=4)
    before = save_load(target.state_dict())
    with pytest.raises(StateDictError, match="depth=3.*depth=2"):
        target.load_state_dict(state)
    assert target.state_dict()["native"]["depth"] == 2
    assert list(target) == list(_loaded(ordering, before))  # the refused load left it as it was
    # depth=None takes the checkpoint's depth (a run saved under the old default of 5 keeps it)
    same = GraBSampler(n=20, ordering=ordering, seed=2, depth=3)
    same.load_state_dict(state)
    default = GraBSampler(n=20, ordering=ordering, seed=2)
    default.load_state_dict(state)
    assert default.state_dict()["native"]["depth"] == 3 and list(default) == list(same) == list(saved)


def _loaded(ordering, state):
    s = GraBSampler(n=20, ordering=ordering, seed=2, depth=2)
    s.load_state_dict(state)
    return s
