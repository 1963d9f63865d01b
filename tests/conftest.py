import io

import numpy as np
import pytest
import torch
from torchgrab import GraBSampler


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
