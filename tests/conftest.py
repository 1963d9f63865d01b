import io
import os

import numpy as np
import pytest
import torch
from torchgrab import GraBSampler
from torchgrab._segments import OuterRows


@pytest.fixture(autouse=True)
def _environment_restored():
    # Frameworks write into os.environ and leave it so: transformers before 5 its TrainingArguments
    # (ACCELERATE_MIXED_PRECISION=bf16 from bf16=True: every later Trainer of the process, and every
    # subprocess, ran under bf16 autocast), Lightning its rank and MASTER_PORT (a later test's torchrun
    # subprocess failed to listen on that port). Each test gets the environment it started with back.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def save_load(state):
    """torch.save then torch.load(weights_only=True): the round trip a checkpoint takes."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_state(a, b, path="state"):
    """Two state dicts equal entry by entry (tensors by dtype and value), naming the first difference."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def feed_epoch(sampler, vectors, per_step=1, limit=None, as_torch=False):
    """Iterate one epoch, stepping the fixed rows of `vectors` for each yielded index."""
    order = []
    batch = []
    for k, i in enumerate(sampler):
        if limit is not None and k >= limit:
            break
        order.append(i)
        batch.append(i)
        if len(batch) == per_step:
            rows = vectors[batch]
            sampler.step(torch.from_numpy(rows) if as_torch else rows)
            batch = []
    if batch:
        rows = vectors[batch]
        sampler.step(torch.from_numpy(rows) if as_torch else rows)
    return order


def is_permutation(order, n):
    return sorted(order) == list(range(n))


@pytest.fixture
def hand_vectors():
    # The 2-D vectors of the hand-computed cases (see test_hand_computed.py).
    return np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, -2.0]])


@pytest.fixture
def make_sampler():
    def make(ordering="grab", n=10, **kw):
        return GraBSampler(n=n, ordering=ordering, **kw)

    return make


def autocast_step(model, x, y, loss_fn, sketch, device="cpu", dtype=torch.bfloat16, n=64, **watch):
    """One watched step with the forward under torch.autocast: (its rows, autocast's own batch gradient,
    the float32 model's), the two gradients projected as the rows are (the sketch is linear: the rows'
    mean is the projection of the batch gradient they sum to)."""
    sampler = GraBSampler(n=n, seed=0)
    list(iter(sampler))
    got = []
    step = sampler.step

    def spy(rows, **kwargs):
        got.append(np.array(rows.expand() if isinstance(rows, OuterRows) else rows, dtype=np.float32, copy=True))
        return step(rows, **kwargs)

    sampler.step = spy
    handle = sampler.watch(model, sketch=sketch, **watch)
    with torch.autocast(device, dtype=dtype):
        loss = loss_fn(model(x), y)
    loss.backward()
    handle.flush()

    def projected():
        grads = {k: (torch.zeros_like(p) if p.grad is None else p.grad)[None] for k, p in model.named_parameters()}
        return handle.project(grads).cpu().numpy()[0]

    mixed = projected()
    model.zero_grad()
    loss_fn(model(x), y).backward()
    return np.concatenate(got), mixed, projected()


def assert_rows_follow_autocast(rows, mixed, full, within, farther, slack):
    """Float32 rows whose mean is autocast's batch gradient up to ``within`` of the float32 gradient's
    largest entry, and no more than ``farther`` times (plus ``slack``) as far from the float32 gradient as
    autocast's is."""
    assert rows.dtype == np.float32 and np.isfinite(rows).all()
    scale = np.abs(full).max()
    mean = rows.mean(0)
    assert np.abs(mean - mixed).max() < within * scale
    assert np.abs(mean - full).max() <= farther * np.abs(mixed - full).max() + slack * scale
