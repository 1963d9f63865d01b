"""Tiny cases computed by hand from GRAB.md's definitions; the expected orders are written out."""

import numpy as np
import pytest
import torch
from conftest import feed_epoch
from torchgrab import GraBSampler


@pytest.mark.parametrize("as_torch", [False, True])
@pytest.mark.parametrize("per_step", [1, 3, 4])
def test_grab_hand_computed(hand_vectors, per_step, as_torch):
    # Epoch 0 visits 0,1,2,3 with m = 0:
    #   g0=(1,0): <s,z>=0 -> +1, s=(1,0)        front: [0]
    #   g1=(1,1): <s,z>=1 -> -1, s=(0,-1)       back:  [1]
    #   g2=(-1,0): <s,z>=0 -> +1, s=(-1,-1)     front: [0,2]
    #   g3=(0,-2): <s,z>=2 -> -1, s=(-1,1)      back:  [3,1]
    # next = [0,2,3,1]; m = mean of raw gradients = (1/4, -1/4).
    # Epoch 1 visits 0,2,3,1 centered by m: <s,z> = 0, -0.875, -0.75, -2.125 -> all +1 -> [0,2,3,1].
    s = GraBSampler(n=4, ordering="grab", first_epoch="identity")
    assert feed_epoch(s, hand_vectors, per_step, as_torch=as_torch) == [0, 1, 2, 3]
    assert feed_epoch(s, hand_vectors, per_step, as_torch=as_torch) == [0, 2, 3, 1]
    assert list(s) == [0, 2, 3, 1]


def test_mean_is_an_alias_of_grab(hand_vectors):
    s = GraBSampler(n=4, ordering="mean", first_epoch="identity")
    feed_epoch(s, hand_vectors)
    assert list(s) == [0, 2, 3, 1]


@pytest.mark.parametrize("per_step", [1, 2, 3, 4])
def test_pair_hand_computed(hand_vectors, per_step):
    # Epoch 0: (0,1): z=(0,-1), s=0 -> +1: 0 front, 1 back; s=(0,-1)
    #          (2,3): z=(-1,2), <s,z>=-2 -> +1: 2 front, 3 back          => [0,2,3,1]
    # Epoch 1: (0,2): z=(2,0) -> +1; s=(2,0). (3,1): z=(-1,-3), <s,z>=-2 -> +1 => [0,3,1,2]
    # Epoch 2: (0,3): z=(1,2) -> +1; s=(1,2). (1,2): z=(2,1), <s,z>=4 -> -1: 2 front, 1 back => [0,2,1,3]
    s = GraBSampler(n=4, ordering="pair", first_epoch="identity")
    feed_epoch(s, hand_vectors, per_step)
    assert feed_epoch(s, hand_vectors, per_step) == [0, 2, 3, 1]
    assert feed_epoch(s, hand_vectors, per_step) == [0, 3, 1, 2]
    assert list(s) == [0, 2, 1, 3]


def test_pair_odd_unit_goes_to_the_middle():
    # n = 3: pair (0,1) is balanced; unit 2 is left open and goes in the middle.
    v = np.array([[1.0], [0.0], [5.0]])
    s = GraBSampler(n=3, ordering="pair", first_epoch="identity")
    feed_epoch(s, v)
    # z = g0 - g1 = 1, s = 0 -> +1: 0 front, 1 back; 2 unsigned -> middle.
    assert list(s) == [0, 2, 1]


def test_early_break_keeps_unseen_units_in_current_order(hand_vectors):
    s = GraBSampler(n=4, ordering="grab", first_epoch="identity")
    feed_epoch(s, hand_vectors, limit=2)
    # 0 -> front (+1), 1 -> back (-1); 2, 3 unseen keep their order in the middle.
    assert list(s) == [0, 2, 3, 1]


def test_random_sign_rule_is_seeded(hand_vectors):
    v = np.random.default_rng(0).normal(size=(50, 3))
    orders = []
    for _ in range(2):
        s = GraBSampler(n=50, ordering="grab", balance="random", seed=7)
        for _ in range(3):
            feed_epoch(s, v, per_step=5)
        orders.append(list(s))
    assert orders[0] == orders[1]
    s = GraBSampler(n=50, ordering="grab", balance="random", seed=8)
    for _ in range(3):
        feed_epoch(s, v, per_step=5)
    assert list(s) != orders[0]


def test_simple_orderings():
    n = 20
    so = GraBSampler(n=n, ordering="so", seed=3)
    assert list(so) == list(so)
    rr = GraBSampler(n=n, ordering="rr", seed=3)
    rr.set_epoch(0)
    e0 = list(rr)
    rr.set_epoch(1)
    e1 = list(rr)
    rr.set_epoch(0)
    assert list(rr) == e0 and e0 != e1 and sorted(e1) == list(range(n))
    ff = GraBSampler(n=n, ordering="flipflop", seed=3)
    a, b, c = list(ff), list(ff), list(ff)
    assert b == a[::-1] and c != a and sorted(c) == list(range(n))
    fixed = GraBSampler(n=4, ordering="fixed", order=[2, 0, 3, 1])
    assert list(fixed) == [2, 0, 3, 1] == list(fixed)
    assert list(GraBSampler(n=5, ordering="fixed")) == [0, 1, 2, 3, 4]
    wr = GraBSampler(n=n, ordering="wr", seed=3)
    draws = list(wr)
    assert len(draws) == n and all(0 <= i < n for i in draws) and len(set(draws)) < n


def test_float64_state_matches_float32_on_exact_values(hand_vectors):
    for dtype in (torch.float32, torch.float64):
        s = GraBSampler(n=4, ordering="grab", first_epoch="identity", dtype=dtype)
        feed_epoch(s, hand_vectors.astype(np.float32))
        assert list(s) == [0, 2, 3, 1]
