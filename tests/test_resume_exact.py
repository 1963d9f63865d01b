"""Checkpoint anywhere: a run interrupted after any step (or between yielding and stepping), saved with
torch.save, loaded with torch.load(weights_only=True) into a fresh sampler and continued, emits exactly
the indices of the uninterrupted run and ends in exactly the same state. Every ordering the native
module lists takes part, so orderings added later are covered without touching this file."""

import io
import pickle

import numpy as np
import pytest
import torch
import torchgrab
import torchgrab.sampler
from conftest import assert_same_state, save_load
from torchgrab import GraBSampler, StateDictError

ORDERINGS = [o for o in torchgrab.orderings() if o != "mean"]  # "mean" is an alias of "grab"
N, D, PER_STEP, EPOCHS = 11, 3, 3, 3
VECTORS = np.random.default_rng(5).normal(size=(N, D)).astype(np.float32)


def drive(s, done=0, stop_after=None, mid_batch=False, non_blocking=False):
    """Feed EPOCHS * N units through `s` in steps of PER_STEP (a partial step ends each epoch).

    Stops after step number `stop_after` (or, with `mid_batch`, just after the next index is yielded)
    and returns (indices emitted, units stepped, state saved and reloaded or None)."""
    emitted, steps = [], 0
    while done < EPOCHS * N:
        batch = []
        for i in s:
            emitted.append(i)
            batch.append(i)
            if mid_batch and steps == stop_after:
                return emitted, done, save_load(s.state_dict())
            if len(batch) == PER_STEP:
                s.step(VECTORS[batch], non_blocking=non_blocking)
                done, steps, batch = done + len(batch), steps + 1, []
                if steps == stop_after and not mid_batch:
                    return emitted, done, save_load(s.state_dict())
        if batch:
            s.step(VECTORS[batch], non_blocking=non_blocking)
            done, steps = done + len(batch), steps + 1
            if steps == stop_after and not mid_batch:
                return emitted, done, save_load(s.state_dict())
    return emitted, done, None


def make(ordering, balance="deterministic", dtype=torch.float32):
    return GraBSampler(n=N, ordering=ordering, seed=3, balance=balance, dtype=dtype)


def total_steps():
    return EPOCHS * -(-N // PER_STEP)


CONFIGS = [(o, "deterministic", torch.float32) for o in ORDERINGS] + [
    ("grab", "random", torch.float32),
    ("pair", "random", torch.float32),
    ("grab", "deterministic", torch.float64),
    ("pair", "deterministic", torch.float64),
]


@pytest.mark.parametrize("mid_batch", [False, True], ids=["after-step", "mid-batch"])
@pytest.mark.parametrize("ordering,balance,dtype", CONFIGS, ids=[f"{o}-{b}-{str(t)[6:]}" for o, b, t in CONFIGS])
def test_interrupt_at_every_step_resumes_bit_for_bit(ordering, balance, dtype, mid_batch):
    ref = make(ordering, balance, dtype)
    ref_emitted, _, _ = drive(ref)
    ref_final = ref.state_dict()
    for k in range(0 if mid_batch else 1, total_steps() + (0 if mid_batch else 1)):
        first = make(ordering, balance, dtype)
        head, done, saved = drive(first, stop_after=k, mid_batch=mid_batch)
        assert saved is not None
        resumed = make(ordering, balance, dtype)
        resumed.load_state_dict(saved)
        # Mid-batch, the index yielded but not stepped is handed out again after the resume.
        in_flight = 1 if mid_batch else 0
        tail, _, _ = drive(resumed, done=done)
        assert head[: len(head) - in_flight] + tail == ref_emitted, f"interrupted after step {k}"
        assert_same_state(resumed.state_dict(), ref_final)


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_non_blocking_steps_checkpoint_and_resume_bit_for_bit(ordering, monkeypatch):
    # Every step in the background (these are tiny), checkpointed with one in flight after every step.
    monkeypatch.setattr(torchgrab.sampler, "_BACKGROUND_MIN_ELEMENTS", 0)
    ref = make(ordering)
    ref_emitted, _, _ = drive(ref)
    ref_final = ref.state_dict()
    for k in range(1, total_steps() + 1):
        head, done, saved = drive(make(ordering), stop_after=k, non_blocking=True)
        resumed = make(ordering)
        resumed.load_state_dict(saved)
        tail, _, _ = drive(resumed, done=done, non_blocking=True)
        assert head + tail == ref_emitted, f"interrupted after step {k}"
        assert_same_state(resumed.state_dict(), ref_final)


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_interrupt_before_the_first_epoch(ordering):
    fresh = make(ordering)
    resumed = make(ordering)
    resumed.load_state_dict(save_load(fresh.state_dict()))
    assert drive(resumed)[0] == drive(make(ordering))[0]


@pytest.mark.parametrize("ordering", ["grab", "pair", "rr", "wr"])
def test_pickle_mid_epoch_goes_through_the_state_dict(ordering):
    s = make(ordering)
    head, done, _ = drive(s, stop_after=4)
    state = s.__getstate__()
    assert set(state) == {"config", "state"}
    copy = pickle.loads(pickle.dumps(s))
    assert_same_state(copy.state_dict(), s.state_dict())
    assert drive(copy, done=done)[0] == drive(s, done=done)[0]


def test_state_dict_is_cached_until_the_state_changes():
    s = make("grab")
    it = iter(s)
    [next(it) for _ in range(4)]
    a, b = s.state_dict(), s.state_dict()
    assert a["native"]["current"] is b["native"]["current"]  # nothing changed: nothing re-exported
    a["native"]["seed"] = 99  # editing the returned dicts does not reach the cache
    assert s.state_dict()["native"]["seed"] == 3
    s.step(VECTORS[s._order[:2]])
    c = s.state_dict()
    assert c["native"]["assembly"]["next"] is not a["native"]["assembly"]["next"]
    assert c["stepped"] == 2 and a["stepped"] == 0


# ------------------------------------------------------------------ refusals
def stepped_sampler(ordering="grab", n=N, d=D):
    s = GraBSampler(n=n, ordering=ordering, seed=3)
    it = iter(s)
    idx = [next(it) for _ in range(5)]
    s.step(np.ones((4, d), np.float32))  # one index stays pending
    return s, idx


def snapshot(s):
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    return buf.getvalue()


@pytest.mark.parametrize("other", [o for o in ORDERINGS if o != "grab"])
def test_a_state_of_another_ordering_is_refused(other):
    target, _ = stepped_sampler("grab")
    before = snapshot(target)
    with pytest.raises(StateDictError, match="ordering"):
        target.load_state_dict(save_load(stepped_sampler(other)[0].state_dict()))
    assert snapshot(target) == before


def test_a_state_of_another_n_or_d_or_dtype_is_refused():
    target, _ = stepped_sampler("pair")
    before = snapshot(target)
    with pytest.raises(StateDictError, match="n=12"):
        target.load_state_dict(stepped_sampler("pair", n=12)[0].state_dict())
    with pytest.raises(StateDictError, match="d = 5"):
        target.load_state_dict(stepped_sampler("pair", d=5)[0].state_dict())
    with pytest.raises(StateDictError, match="float64"):
        target.load_state_dict(GraBSampler(n=N, ordering="pair", dtype=torch.float64).state_dict())
    assert snapshot(target) == before


def corruptions():
    """(name, edit of a saved state dict, message expected in the StateDictError)."""

    def setk(path, value):
        def edit(st):
            d = st
            for k in path[:-1]:
                d = d[k]
            d[path[-1]] = value(d[path[-1]]) if callable(value) else value

        return edit

    def delk(path):
        def edit(st):
            d = st
            for k in path[:-1]:
                d = d[k]
            del d[path[-1]]

        return edit

    def nan_sum(st):
        st["native"]["balance"]["s"][0] = float("nan")

    def repeated_placed_unit(st):
        a = st["native"]["assembly"]
        placed = torch.cat([a["next"], a["next_back"]])
        placed[-1] = placed[0]
        a["next"], a["next_back"] = placed[: len(a["next"])], placed[len(a["next"]) :]

    return [
        ("not a dict", None, "GraBSampler.state_dict"),
        ("missing native", delk(["native"]), "GraBSampler.state_dict"),
        ("missing seed", delk(["native", "seed"]), "seed"),
        ("version", setk(["native", "version"], 99), "version 99"),
        ("ordering name", setk(["native", "ordering"], "zigzag"), "unknown ordering"),
        ("seed type", setk(["native", "seed"], "zero"), "wrong type"),
        ("repeated entry", setk(["native", "current"], lambda t: torch.zeros_like(t)), "not a permutation"),
        ("short order", setk(["native", "current"], lambda t: t[:-1]), "entries"),
        ("float order", setk(["native", "current"], lambda t: t.float()), "32-bit integer"),
        ("order as list", setk(["native", "current"], lambda t: t.tolist()), "1-D array"),
        ("sum length", setk(["native", "balance", "m"], lambda t: t[:1]), "inconsistent lengths"),
        ("NaN sum", nan_sum, "non-finite"),
        ("balance kind", setk(["native", "balance", "kind"], "median"), "unknown balance kind"),
        ("front pointer", setk(["native", "assembly", "front"], 10**6), "do not fit"),
        ("placed unit twice", repeated_placed_unit, "placed units are not distinct"),
        (
            "block length",
            setk(["native", "assembly", "next_back"], lambda t: torch.cat([t, t.new_zeros(1)])),
            "do not fit",
        ),
        ("cursor", setk(["stepped"], 10**6), "inconsistent cursors"),
        ("cursor type", setk(["yielded"], "many"), "cursor"),
        ("rng without random signs", setk(["native", "sign_rng"], [1, 2, 3, 4]), "RNG"),
        ("state dtype", setk(["native", "state_dtype"], "float16"), "float16"),
    ]


@pytest.mark.parametrize("name,edit,message", corruptions(), ids=[c[0] for c in corruptions()])
def test_corrupted_states_are_refused_and_change_nothing(name, edit, message):
    source, _ = stepped_sampler("grab")
    state = save_load(source.state_dict())
    if edit is None:
        state = [state]
    else:
        edit(state)
    target, _ = stepped_sampler("grab")
    target.step(np.ones((1, D), np.float32) * 2)
    before = snapshot(target)
    cursors = (target._yielded, target._stepped, target._epoch)
    with pytest.raises(StateDictError, match=message):
        target.load_state_dict(state)
    assert snapshot(target) == before
    assert (target._yielded, target._stepped, target._epoch) == cursors


def test_where_a_resumed_epoch_continues():
    v = np.ones((10, 2), np.float32)

    def saved(finish, stepped):
        s = GraBSampler(n=10, ordering="rr", seed=0)
        it = iter(s)
        order = [next(it) for _ in range(10)]
        s.step(v[:stepped])
        if finish:
            assert list(it) == []  # the loop ran to its end
        return save_load(s.state_dict()), order

    def fresh(state, epoch=None):
        s = GraBSampler(n=10, ordering="rr", seed=0)
        s.load_state_dict(state)
        if epoch is not None:
            s.set_epoch(epoch)
        return s

    # Inside the loop, everything stepped: the remainder of the epoch is empty, then epoch 1.
    state, order = saved(finish=False, stepped=10)
    s = fresh(state)
    assert list(s) == [] and s._native.epoch == 0
    assert list(s) == GraBSampler(n=10, ordering="rr", seed=0)._native.begin_epoch(1).tolist()
    # After the loop, everything stepped: the next epoch begins.
    state, order = saved(finish=True, stepped=10)
    s = fresh(state)
    nxt = list(s)
    assert s._native.epoch == 1 and sorted(nxt) == list(range(10))
    # Units left unstepped (a drop_last tail): they are handed out again...
    state, order = saved(finish=True, stepped=8)
    assert list(fresh(state)) == order[8:]
    # ...unless set_epoch says which epoch comes next.
    s = fresh(state, epoch=1)
    assert list(s) == nxt and s._native.epoch == 1
    assert list(fresh(state, epoch=0)) == order[8:]


def test_regression_wrapping_assembly_pointers():
    """Found by the state_from_bytes fuzzer: front + back wrapping around 2^64 passed the bounds check
    and crashed on a slice; a state dict could carry them. Refused now, state unchanged."""
    source, _ = stepped_sampler("grab")
    state = save_load(source.state_dict())
    state["native"]["assembly"]["front"] = 2**63
    state["native"]["assembly"]["back"] = 2**63
    target, _ = stepped_sampler("grab")
    before = snapshot(target)
    with pytest.raises(StateDictError, match="pointers"):
        target.load_state_dict(state)
    assert snapshot(target) == before
