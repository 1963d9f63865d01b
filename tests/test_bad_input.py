"""Every refused input raises a torchgrab.GraBError subclass naming what was expected, and leaves the
sampler's state exactly as it was (compared through state_dict)."""

import io
import re

import numpy as np
import pytest
import torch
import torchgrab
from conftest import assert_same_state
from torchgrab import (
    CallOrderError,
    GraBError,
    GraBSampler,
    NonFiniteGradientError,
    ShapeError,
    UnitIndexError,
    UnsupportedInputError,
)


def snapshot(sampler):
    buf = io.BytesIO()
    torch.save(sampler.state_dict(), buf)
    return buf.getvalue()


def started(ordering="grab", n=10, d=4, stepped=2):
    s = GraBSampler(n=n, ordering=ordering, seed=0)
    it = iter(s)
    for _ in range(n):
        next(it)
    s.step(np.ones((stepped, d), dtype=np.float32))
    return s


nan_rows = np.ones((3, 4), dtype=np.float32)
nan_rows[2, 1] = np.nan
inf_rows = np.ones((3, 4), dtype=np.float64)
inf_rows[0, 0] = np.inf

CASES = [
    ("wrong width", lambda: np.ones((2, 5), np.float32), None, ShapeError, "d = 4"),
    ("more rows than pending", lambda: np.ones((9, 4), np.float32), None, ShapeError, "only 8 indices are pending"),
    ("NaN", lambda: nan_rows, None, NonFiniteGradientError, "NaN or Inf"),
    ("Inf", lambda: inf_rows, None, NonFiniteGradientError, "NaN or Inf"),
    ("int dtype", lambda: np.ones((2, 4), np.int32), None, UnsupportedInputError, "dtype int32"),
    ("complex torch", lambda: torch.ones(2, 4, dtype=torch.complex64), None, UnsupportedInputError, "complex64"),
    ("non-contiguous numpy", lambda: np.ones((4, 2), np.float32).T, None, UnsupportedInputError, "not C-contiguous"),
    ("negative strides", lambda: np.ones((2, 4), np.float32)[::-1], None, UnsupportedInputError, "negatively strided"),
    ("non-contiguous torch", lambda: torch.ones(4, 2).t(), None, UnsupportedInputError, "not contiguous"),
    (
        "mismatched rows",
        lambda: [np.ones((2, 2), np.float32), np.ones((3, 2), np.float32)],
        None,
        ShapeError,
        "leading dimension",
    ),
    (
        "mixed dtypes",
        lambda: [np.ones((2, 2), np.float32), np.ones((2, 2), np.float64)],
        None,
        UnsupportedInputError,
        "one dtype",
    ),
    ("zero rows", lambda: np.ones((0, 4), np.float32), None, ShapeError, "0 rows"),
    ("zero width", lambda: np.ones((2, 0), np.float32), None, ShapeError, "d = 0"),
    ("scalar", lambda: np.array(1.0, dtype=np.float32), None, ShapeError, "scalar"),
    ("a python list of floats", lambda: [[1.0, 2.0]], None, UnsupportedInputError, "list"),
    ("empty dict", lambda: {}, None, ShapeError, "empty"),
    ("index out of range", lambda: np.ones((1, 4), np.float32), [10], UnitIndexError, "[0, 10)"),
    ("negative index", lambda: np.ones((1, 4), np.float32), [-1], UnitIndexError, "[0, 10)"),
    ("repeated index", lambda: np.ones((2, 4), np.float32), [5, 5], UnitIndexError, "twice"),
    ("index count mismatch", lambda: np.ones((2, 4), np.float32), [5], ShapeError, "2 rows but 1 indices"),
]


@pytest.mark.parametrize("ordering", ["grab", "pair"])
@pytest.mark.parametrize("name,make,indices,exc,message", CASES, ids=[c[0] for c in CASES])
def test_refused_steps_leave_the_state_untouched(ordering, name, make, indices, exc, message):
    s = started(ordering)
    before = snapshot(s)
    cursors = (s._yielded, s._stepped)
    with pytest.raises(exc, match=re.escape(message)) as info:
        s.step(make(), indices=indices)
    assert isinstance(info.value, GraBError) and isinstance(info.value, ValueError)
    assert snapshot(s) == before
    assert (s._yielded, s._stepped) == cursors
    s.step(np.ones((2, 4), np.float32))  # and it still works afterwards


def test_already_balanced_unit_is_refused():
    s = started("grab")
    first = int(s._order[0])
    before = snapshot(s)
    with pytest.raises(UnitIndexError, match="already received"):
        s.step(np.ones((1, 4), np.float32), indices=[first])
    assert snapshot(s) == before


def test_step_before_iteration():
    s = GraBSampler(n=5)
    with pytest.raises(CallOrderError, match="before the sampler was iterated"):
        s.step(np.ones((1, 3), np.float32))
    with pytest.raises(CallOrderError, match="before any epoch began"):
        s.step(np.ones((1, 3), np.float32), indices=[0])


def test_cuda_tensors_are_refused_cleanly():
    s = started("grab")
    before = snapshot(s)
    fake = torch.ones(2, 4, device="meta")  # any non-CPU device takes the same path as CUDA
    # This sampler already balanced CPU gradients with the Rust kernel: a device tensor is refused
    # (one path per sampler); with device_path="never", any device tensor is refused.
    with pytest.raises(UnsupportedInputError, match="one device per sampler"):
        s.step(fake)
    assert snapshot(s) == before
    never = GraBSampler(n=4, device_path="never")
    list(never)
    with pytest.raises(UnsupportedInputError, match="CPU buffers only"):
        never.step(fake)
    fresh = GraBSampler(n=4)
    list(fresh)
    with pytest.raises(UnsupportedInputError, match="meta"):
        fresh.step(fake)


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        (dict(n=0), ShapeError),
        (dict(n=-3), ShapeError),
        (dict(), ShapeError),
        (dict(n=5, ordering="nope"), UnsupportedInputError),
        (dict(n=5, first_epoch="sorted"), UnsupportedInputError),
        (dict(n=5, balance="maybe"), UnsupportedInputError),
        (dict(n=5, dtype=torch.int32), UnsupportedInputError),
        (dict(n=5, seed=-1), UnsupportedInputError),
        (dict(n=3, ordering="fixed", order=[0, 0, 1]), GraBError),
        (dict(n=3, ordering="grab", order=[0, 1, 2]), UnsupportedInputError),
        (dict(data_source=[1, 2, 3], n=4), ShapeError),
        (dict(n=4, ordering="herding", rounds=0), UnsupportedInputError),
        (dict(n=4, ordering="herding", rounds=1001), UnsupportedInputError),
    ],
)
def test_bad_constructor_arguments(kwargs, exc):
    with pytest.raises(exc):
        GraBSampler(**kwargs)


def test_orderings_lists_the_contract_names():
    assert {"rr", "so", "wr", "fixed", "flipflop", "grab", "mean", "pair"} <= set(torchgrab.orderings())


@pytest.mark.parametrize("bad_row", [0, 1, 2, 3, 4])
def test_a_refused_step_through_the_two_row_pass_changes_nothing(bad_row):
    # d >= 16,384 float32 `grab` steps take the two-row pass (rows decided two at a time, with
    # speculative dots): a NaN in any row refuses the whole step, names that row, and changes nothing.
    d, n = 20_003, 12
    v = np.random.default_rng(5).normal(size=(n, d)).astype(np.float32)
    s = GraBSampler(n=n, ordering="grab", seed=1)
    order = list(s)
    s.step(v[order[:5]])
    s2 = GraBSampler(n=n, ordering="grab", seed=1)
    list(s2)
    s2.step(v[order[:5]])
    before = s.state_dict()
    rows = v[order[5:10]].copy()
    rows[bad_row, 777] = np.nan
    with pytest.raises(NonFiniteGradientError, match=rf"unit {order[5 + bad_row]} \(row {bad_row} "):
        s.step(rows)
    assert_same_state(s.state_dict(), before)
    s.step(v[order[5:10]])  # the same rows, finite: as if the refused step never happened
    s2.step(v[order[5:10]])
    assert_same_state(s.state_dict(), s2.state_dict())
