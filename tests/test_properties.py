"""Property tests: every emitted order is a permutation; batching and segmentation do not change signs."""

import numpy as np
import torch
from conftest import feed_epoch, is_permutation
from hypothesis import given, settings
from hypothesis import strategies as st
from torchgrab import GraBSampler

BALANCING = ["grab", "pair"]
ALL = ["rr", "so", "fixed", "flipflop", "grab", "pair"]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 9),
    per_step=st.integers(1, 8),
    ordering=st.sampled_from(ALL),
    seed=st.integers(0, 2**32),
    limit=st.integers(0, 45),
)
def test_orders_are_permutations_and_batching_does_not_matter(n, d, per_step, ordering, seed, limit):
    v = np.random.default_rng(seed).normal(size=(n, d)) + 0.5
    one = GraBSampler(n=n, ordering=ordering, seed=seed)
    many = GraBSampler(n=n, ordering=ordering, seed=seed)
    for _ in range(3):
        o1 = feed_epoch(one, v, per_step=1)
        o2 = feed_epoch(many, v, per_step=per_step)
        assert o1 == o2
        assert is_permutation(o1, n)
    feed_epoch(many, v, per_step=per_step, limit=limit)  # an early break
    assert is_permutation(list(many), n)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 30),
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    ordering=st.sampled_from(BALANCING),
    per_step=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_list_of_segments_equals_the_concatenated_matrix(n, widths, ordering, per_step, seed):
    d = sum(widths)
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    cuts = np.cumsum(widths)[:-1]
    whole = GraBSampler(n=n, ordering=ordering, seed=seed)
    parts = GraBSampler(n=n, ordering=ordering, seed=seed)
    for _ in range(3):
        o_whole = list(whole)
        o_parts = list(parts)
        assert o_whole == o_parts
        for lo in range(0, n, per_step):
            rows = v[o_whole[lo : lo + per_step]]
            whole.step(rows, indices=o_whole[lo : lo + per_step])
            segs = [torch.from_numpy(np.ascontiguousarray(p)) for p in np.split(rows, cuts, axis=1)]
            parts.step({f"p{k}": s for k, s in enumerate(segs)}, indices=o_parts[lo : lo + per_step])
    assert list(whole) == list(parts)
    assert whole.state_dict()["native"]["balance"]["s"].equal(parts.state_dict()["native"]["balance"]["s"])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), d=st.integers(1, 8), seed=st.integers(0, 1000), ordering=st.sampled_from(BALANCING))
def test_16_bit_gradients_equal_their_widened_float32(n, d, seed, ordering):
    rng = np.random.default_rng(seed)
    for half in (torch.float16, torch.bfloat16):
        v = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32)).to(half)
        a = GraBSampler(n=n, ordering=ordering, seed=seed)
        b = GraBSampler(n=n, ordering=ordering, seed=seed)
        for _ in range(2):
            oa = list(a)
            for i in oa:
                a.step(v[i : i + 1])
            ob = list(b)
            for i in ob:
                b.step(v[i : i + 1].float())
            assert oa == ob
        assert list(a) == list(b)


def test_large_d_batching_does_not_matter_bit_for_bit():
    # From d = 16,384 float32 `grab` steps of several rows take the two-row pass (two decided rows
    # applied per sweep, the next dot formed for both signs of the row before it); one row per step
    # takes the per-row pass. Orders and running sums must agree bit for bit, also after an early break
    # (a step of fewer rows) and with the stale mean of later epochs in play.
    for d, per_step, seed in [(16_384, 2, 0), (20_011, 3, 1), (50_000, 5, 2), (70_001, 8, 3)]:
        n = 23
        rng = np.random.default_rng(seed)
        v = (rng.normal(size=(n, d)) * rng.choice([1e-3, 1.0, 30.0], size=d) + 0.2).astype(np.float32)
        one = GraBSampler(n=n, ordering="grab", seed=seed)
        many = GraBSampler(n=n, ordering="grab", seed=seed)
        for epoch in range(3):
            o1 = feed_epoch(one, v, per_step=1, limit=17 if epoch == 1 else None)
            o2 = feed_epoch(many, v, per_step=per_step, limit=17 if epoch == 1 else None)
            assert o1 == o2, (d, per_step, epoch)
        b1, b2 = one.state_dict()["native"]["balance"], many.state_dict()["native"]["balance"]
        for key in ("s", "m", "m_next"):
            assert b1[key].equal(b2[key]), (d, key)
        assert list(one) == list(many)
