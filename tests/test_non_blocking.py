"""non_blocking=True steps: the kernel balances in the background; nothing else may differ."""

import copy
import pickle
import sys

import numpy as np
import pytest
import torch
import torchgrab.sampler
from torch import nn
from torchgrab import GraBSampler, NonFiniteGradientError, ShapeError, UnsupportedInputError

N, BATCH = 24, 5  # the last batch of an epoch is short


DEFAULT_MIN_ELEMENTS = torchgrab.sampler._BACKGROUND_MIN_ELEMENTS


@pytest.fixture(autouse=True)
def background_for_every_size(monkeypatch):
    """The tests' steps are tiny; in use, steps under 2^16 elements run blocking (tested below)."""
    monkeypatch.setattr(torchgrab.sampler, "_BACKGROUND_MIN_ELEMENTS", 0)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)


def train(sampler, epochs, method="hooks", non_blocking=False):
    """SGD over `epochs` epochs in the sampler's order, through sampler.backward; returns the orders."""
    model, (x, y) = make_model(), data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    orders = []
    for _ in range(epochs):
        order = list(sampler)
        orders.append(order)
        for k in range(0, N, BATCH):
            idx = order[k : k + BATCH]
            opt.zero_grad(set_to_none=True)
            sampler.backward(
                model, nn.functional.cross_entropy, x[idx], y[idx], method=method, non_blocking=non_blocking
            )
            opt.step()
    return orders


def native_state(sampler):
    return sampler.state_dict()["native"]


def assert_same_tree(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("ordering", ["grab", "pair", "recursive"])
@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_non_blocking_gives_the_orders_and_state_of_blocking_steps(ordering, method):
    sync = GraBSampler(n=N, ordering=ordering, seed=3)
    background = GraBSampler(n=N, ordering=ordering, seed=3)
    orders = train(sync, 4, method)
    assert train(background, 4, method, non_blocking=True) == orders
    assert len(set(map(tuple, orders))) > 1  # the orders did change from epoch to epoch
    assert_same_tree(native_state(background), native_state(sync))
    assert list(background) == list(sync)


def test_backward_returns_with_its_step_running_in_the_background():
    sampler = GraBSampler(n=N)
    model, (x, y) = make_model(), data()
    order = list(sampler)
    sampler.backward(model, nn.functional.cross_entropy, x[order[:BATCH]], y[order[:BATCH]], non_blocking=True)
    assert sampler._lock.busy  # handed to the worker, not yet waited for
    assert sampler.pending == N - BATCH  # the bookkeeping is already done
    state = sampler.state_dict()  # waits for it
    assert not sampler._lock.busy
    assert state["stepped"] == BATCH and state["native"]["balance"]["s"].abs().sum() > 0


def test_step_skip_and_set_epoch_see_the_background_step_first():
    sync, background = GraBSampler(n=N, seed=5), GraBSampler(n=N, seed=5)
    model, (x, y) = make_model(), data()
    for s in (sync, background):
        nb = s is background
        order = list(s)
        s.backward(model, nn.functional.cross_entropy, x[order[:BATCH]], y[order[:BATCH]], non_blocking=nb)
        s.skip(2)
        g = torch.randn(3, 53, generator=torch.Generator().manual_seed(9))  # d of make_model()
        s.step(g, non_blocking=nb)
        s.step(g[:1], indices=[order[20]], non_blocking=nb)
        s.backward(model, nn.functional.cross_entropy, x[order[10:15]], y[order[10:15]], non_blocking=nb)
        s.set_epoch(7)
    assert_same_tree(sync.state_dict(), background.state_dict())


def test_the_background_note_reaches_the_error_before_python_311_too():
    # BaseException.add_note is Python 3.11+; the package supports 3.9. Before 3.11 the note goes into
    # __notes__ and the message. A stand-in without add_note takes the path older Pythons take.
    from torchgrab._background import add_note

    class Old(Exception):
        add_note = property(lambda self: (_ for _ in ()).throw(AttributeError("add_note")))

    error = Old("the step was refused")
    assert not hasattr(error, "add_note")
    add_note(error, "(from the background)")
    add_note(error, "(again)")
    assert error.__notes__ == ["(from the background)", "(again)"]
    assert str(error) == "the step was refused (from the background) (again)"
    new = ValueError("x")
    add_note(new, "(n)")
    assert new.__notes__ == ["(n)"] and (str(new) == "x" or sys.version_info < (3, 11))


def test_a_refused_background_step_raises_at_the_next_call_and_changes_nothing():
    sampler = GraBSampler(n=N, ordering="grab", seed=2)
    model, (x, y) = make_model(), data()
    order = list(sampler)
    loss = nn.functional.cross_entropy
    sampler.backward(model, loss, x[order[:BATCH]], y[order[:BATCH]], non_blocking=True)
    before = copy.deepcopy(sampler.state_dict())
    bad = x[order[BATCH : 2 * BATCH]].clone()
    bad[1] = float("nan")
    sampler.backward(model, loss, bad, y[order[BATCH : 2 * BATCH]], non_blocking=True)  # the kernel runs later
    with pytest.raises(NonFiniteGradientError, match="NaN or Inf") as info:
        sampler.state_dict()
    assert any("background" in note for note in info.value.__notes__)
    assert_same_tree(sampler.state_dict(), before)  # raised once; the state is the one before the step
    assert sampler.pending == N - BATCH

    # The same steps, blocking: refused at once, and the run goes on identically.
    sync = GraBSampler(n=N, ordering="grab", seed=2)
    model2 = make_model()
    assert list(sync) == order
    sync.backward(model2, loss, x[order[:BATCH]], y[order[:BATCH]])
    with pytest.raises(NonFiniteGradientError):
        sync.backward(model2, loss, bad, y[order[BATCH : 2 * BATCH]])
    for s, m in ((sampler, model), (sync, model2)):
        m.zero_grad()
        s.backward(m, loss, x[order[BATCH : 2 * BATCH]], y[order[BATCH : 2 * BATCH]])
    assert_same_tree(sampler.state_dict(), sync.state_dict())


@pytest.mark.parametrize("call", ["synchronize", "backward", "iterate", "load_state_dict", "pickle"])
def test_the_deferred_error_surfaces_at_whichever_call_comes_next(call):
    sampler = GraBSampler(n=BATCH)
    model, (x, y) = make_model(), data()
    list(sampler)
    saved = sampler.state_dict()
    bad = x[:BATCH].clone()
    bad[0, 0] = float("inf")
    sampler.backward(model, nn.functional.cross_entropy, bad, y[:BATCH], non_blocking=True)
    model.zero_grad()
    with pytest.raises(NonFiniteGradientError):
        if call == "synchronize":
            sampler.synchronize()
        elif call == "backward":
            sampler.backward(model, nn.functional.cross_entropy, x[:BATCH], y[:BATCH])
        elif call == "iterate":
            next(iter(sampler))
        elif call == "load_state_dict":
            sampler.load_state_dict(saved)
        else:
            pickle.dumps(sampler)
    if call == "backward":  # refused before its own step: its gradient was not handed out either
        assert all(p.grad is None for p in model.parameters())
    assert sampler.pending == BATCH and not sampler._lock.busy


def test_pickling_and_checkpoints_wait_for_the_background_step():
    sync, background = GraBSampler(n=N, seed=4), GraBSampler(n=N, seed=4)
    train(sync, 2)
    train(background, 2, non_blocking=True)
    assert background._lock.busy
    copied = pickle.loads(pickle.dumps(background))
    assert_same_tree(native_state(copied), native_state(sync))
    restored = GraBSampler(n=N, seed=4)
    restored.load_state_dict(background.state_dict())
    assert train(restored, 2, non_blocking=True) == train(sync, 2)


def test_unit_steps_stay_blocking():
    sampler, twin = GraBSampler(n=N, unit_size=2), GraBSampler(n=N, unit_size=2)
    model, (x, y) = make_model(), data()
    for s in (sampler, twin):
        order = list(s)
        s.backward(model, nn.functional.cross_entropy, x[order[:4]], y[order[:4]], non_blocking=s is sampler)
    assert not sampler._lock.busy
    assert_same_tree(sampler.state_dict(), twin.state_dict())


def test_non_blocking_must_be_a_bool_and_a_refusal_changes_nothing():
    sampler = GraBSampler(n=4)
    list(sampler)
    with pytest.raises(UnsupportedInputError, match="non_blocking"):
        sampler.step(torch.ones(2, 3), non_blocking=1)
    assert sampler.pending == 4 and not sampler._lock.busy


def test_a_reused_index_array_does_not_reach_the_background_step():
    sync, background = GraBSampler(n=N, seed=6), GraBSampler(n=N, seed=6)
    g = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    for s in (sync, background):
        list(s)
        idx = np.array([3, 7], dtype=np.uint32)
        s.step(g, indices=idx, non_blocking=s is background)
        idx[:] = [0, 1]  # the caller reuses its buffer at once
        s.step(g, indices=idx)
    assert_same_tree(sync.state_dict(), background.state_dict())


# ------------------------------------------------------------------ the Rust side, called directly


def native_pair(dtype="float32"):
    from torchgrab import _native

    pair = [_native.NativeSampler("grab", 16, 0, state_dtype=dtype) for _ in range(2)]
    for native in pair:
        native.begin_epoch(0)
    return pair


def sums(native):
    return np.array(native.state()["balance"]["s"])


@pytest.mark.parametrize("kind", ["float32", "float64", "float16", "bfloat16"])
def test_step_start_equals_step_and_keeps_the_arrays_alive(kind):
    blocking, background = native_pair()
    rng = np.random.default_rng(0)
    idx = np.arange(6, dtype=np.uint32)
    for chunk in range(2):
        grads = rng.standard_normal((6, 40_000)).astype(np.float32)  # wide enough for the forked passes
        if kind in ("float16", "bfloat16"):
            segs = [torch.from_numpy(grads).to(getattr(torch, kind)).view(torch.int16).numpy().view(np.uint16)]
        else:
            segs = [grads.astype(kind)[:, :15_000].copy(), grads.astype(kind)[:, 15_000:].copy()]
        blocking.step(segs, kind, idx + 6 * chunk)
        background.step_start(segs, kind, idx + 6 * chunk)
        assert background.busy
        del segs, grads  # the Rust side holds the arrays until the step is done
    assert background.epochs_begun == 1 and not background.busy  # any call waits first
    np.testing.assert_array_equal(sums(background), sums(blocking))


def test_step_start_checks_its_input_before_lending_anything():
    _, native = native_pair()
    with pytest.raises(ShapeError):
        native.step_start(
            [np.ones((3, 4), np.float32), np.ones((2, 4), np.float32)], "float32", np.arange(3, dtype=np.uint32)
        )
    assert not native.busy
    with pytest.raises(UnsupportedInputError):
        native.step_start([np.ones((3, 4), np.int32)], "float32", np.arange(3, dtype=np.uint32))
    assert not native.busy


def test_a_refused_step_start_leaves_the_state_as_it_was():
    _, native = native_pair()
    native.step([np.ones((2, 5), np.float32)], "float32", np.arange(2, dtype=np.uint32))
    before = sums(native)
    bad = np.ones((2, 5), np.float32)
    bad[1, 3] = np.nan
    native.step_start([bad], "float32", np.arange(2, 4, dtype=np.uint32))
    with pytest.raises(NonFiniteGradientError):
        native.wait_step()
    assert not native.busy
    np.testing.assert_array_equal(sums(native), before)
    native.wait_step()  # raised once
    native.step([np.ones((2, 5), np.float32)], "float32", np.arange(2, 4, dtype=np.uint32))  # same units again


def test_dropping_a_sampler_with_a_step_in_flight_waits_for_it():
    import gc

    for _ in range(20):
        _, native = native_pair()
        native.step_start([np.ones((8, 50_000), np.float32)], "float32", np.arange(8, dtype=np.uint32))
        del native
        gc.collect()


def test_two_threads_stepping_non_blocking_are_serialized():
    import threading

    n, d = 300, 40
    v = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    sampler = GraBSampler(n=n, seed=0)
    order = list(sampler)
    errors = []

    def worker(part):
        try:
            for lo in range(0, len(part), 5):
                chunk = part[lo : lo + 5]
                sampler.step(v[chunk], indices=chunk, non_blocking=True)
                sampler.state_dict()  # waits for whichever step is in flight, from either thread
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(h,)) for h in (order[: n // 2], order[n // 2 :])]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    nxt = list(sampler)  # every unit was balanced once: the next order is a permutation
    assert sorted(nxt) == list(range(n)) and nxt != order


def test_the_on_device_path_steps_blocking():
    sampler = GraBSampler(n=8, device_path="always")
    list(sampler)
    sampler.step(torch.ones(4, 6), non_blocking=True)
    assert not sampler._lock.busy and sampler.pending == 4


def test_tiny_steps_run_blocking_and_large_ones_in_the_background(monkeypatch):
    assert DEFAULT_MIN_ELEMENTS == 1 << 16
    monkeypatch.setattr(torchgrab.sampler, "_BACKGROUND_MIN_ELEMENTS", DEFAULT_MIN_ELEMENTS)
    sampler = GraBSampler(n=64)
    list(sampler)
    sampler.step(torch.ones(1, 1 << 15), non_blocking=True)  # 32,768 elements
    assert not sampler._lock.busy
    sampler.step(torch.ones(2, 1 << 15), non_blocking=True)  # 65,536
    assert sampler._lock.busy
    sampler.synchronize()
    assert sampler.pending == 61
