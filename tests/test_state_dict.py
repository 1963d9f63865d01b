"""Checkpoints: state_dict() is plain ints, strings, lists and tensors (weights_only loading), and a
sampler restored from it continues with exactly the same orders."""

import pickle

import numpy as np
import pytest
from conftest import feed_epoch, save_load
from torchgrab import GraBSampler, StateDictError

ORDERINGS = ["rr", "so", "wr", "fixed", "flipflop", "grab", "pair"]


@pytest.mark.parametrize("balance", ["deterministic", "random"])
@pytest.mark.parametrize("ordering", ORDERINGS)
def test_resume_at_epoch_boundary_gives_identical_orders(ordering, balance):
    v = np.random.default_rng(1).normal(size=(37, 6)).astype(np.float32)
    a = GraBSampler(n=37, ordering=ordering, seed=4, balance=balance)
    for _ in range(2):
        feed_epoch(a, v, per_step=5)
    b = GraBSampler(n=37, ordering=ordering, seed=4, balance=balance)
    b.load_state_dict(save_load(a.state_dict()))
    for _ in range(3):
        assert feed_epoch(a, v, per_step=5) == feed_epoch(b, v, per_step=5)


@pytest.mark.parametrize("ordering", ["grab", "pair"])
def test_resume_mid_epoch_continues_the_epoch(ordering):
    v = np.random.default_rng(2).normal(size=(21, 3))
    a = GraBSampler(n=21, ordering=ordering, seed=1)
    feed_epoch(a, v, per_step=4)
    it = iter(a)
    first = [next(it) for _ in range(9)]
    a.step(v[first])
    state = save_load(a.state_dict())
    rest_a = list(it)
    a.step(v[rest_a])
    b = GraBSampler(n=21, ordering=ordering, seed=1)
    b.load_state_dict(state)
    rest_b = list(b)
    assert rest_b == rest_a
    b.step(v[rest_b])
    assert list(a) == list(b)


def test_pickle_goes_through_the_state_dict():
    v = np.random.default_rng(3).normal(size=(12, 2))
    a = GraBSampler(n=12, ordering="pair")
    feed_epoch(a, v, per_step=3)
    b = pickle.loads(pickle.dumps(a))
    assert feed_epoch(a, v) == feed_epoch(b, v)


def test_mismatched_or_corrupted_states_are_refused_and_change_nothing():
    v = np.random.default_rng(3).normal(size=(12, 2))
    a = GraBSampler(n=12, ordering="grab")
    feed_epoch(a, v, per_step=3)
    good = a.state_dict()
    target = GraBSampler(n=12, ordering="grab")
    feed_epoch(target, v)
    before = str(target.state_dict())
    with pytest.raises(StateDictError, match="ordering"):
        target.load_state_dict(GraBSampler(n=12, ordering="pair").state_dict())
    with pytest.raises(StateDictError, match="n=13"):
        target.load_state_dict(GraBSampler(n=13, ordering="grab").state_dict())
    broken = save_load(good)
    broken["native"]["current"][0] = broken["native"]["current"][1]
    with pytest.raises(StateDictError, match="not a permutation"):
        target.load_state_dict(broken)
    broken = save_load(good)
    del broken["native"]["seed"]
    with pytest.raises(StateDictError, match="seed"):
        target.load_state_dict(broken)
    broken = save_load(good)
    broken["native"]["balance"]["m"] = broken["native"]["balance"]["m"][:1]
    with pytest.raises(StateDictError, match="inconsistent lengths"):
        target.load_state_dict(broken)
    with pytest.raises(StateDictError):
        target.load_state_dict({"hello": 1})
    assert str(target.state_dict()) == before


@pytest.mark.parametrize("ordering", ["grab", "pair", "rr"])
def test_replay_epoch_hands_the_saved_epoch_out_again_from_its_start(ordering):
    # A loader that skips the trained batches itself (the Hugging Face Trainer's skip_first_batches)
    # iterates the resumed epoch from its first index; those indices were stepped before the checkpoint.
    v = np.random.default_rng(3).normal(size=(21, 3))
    a = GraBSampler(n=21, ordering=ordering, seed=2)
    feed_epoch(a, v, per_step=4)
    it = iter(a)
    first = [next(it) for _ in range(12)]  # 12 yielded (read ahead), 8 stepped
    a.step(v[first[:8]])
    state = save_load(a.state_dict())
    rest = first[8:] + list(it)
    a.step(v[first[8:]])
    a.step(v[rest[4:]])
    b = GraBSampler(n=21, ordering=ordering, seed=2)
    b.load_state_dict(state, replay_epoch=True)
    replayed = list(b)
    assert replayed == first[:8] + rest
    assert b.pending == 13  # the 8 stepped before the checkpoint are not pending again
    b.step(v[replayed[8:]])
    assert feed_epoch(a, v, per_step=5) == feed_epoch(b, v, per_step=5)


def test_replay_epoch_refusals_change_nothing():
    a = GraBSampler(n=5)
    list(a)
    with pytest.raises(Exception, match="replay_epoch"):
        a.load_state_dict(a.state_dict(), replay_epoch="yes")
    with pytest.raises(Exception, match="one"):
        a.load_state_dict(a.state_dict(), replay_epoch=True, newer_than_loader=True)
    assert a.pending == 5
