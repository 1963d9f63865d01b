"""More of the bad-input table (tests/test_bad_input.py has the first part): shapes, dtypes, NaN/Inf in
every position and precision, strided and negatively strided buffers, zero-size batches, row counts
that do not match the pending indices, wrong devices and calls in the wrong order. Each is refused
with a torchgrab exception that names what was expected, and the state (state dict, cursors) is
exactly as before.

NaN/Inf policy: a step whose gradients hold any NaN or Inf is refused whole
(NonFiniteGradientError); nothing of it is applied. Orderings that do not use gradients (rr, so, wr,
fixed, flipflop) never read the values, so for them only the shape of the step is checked.
"""

import io
import re

import numpy as np
import pytest
import torch
from torchgrab import (
    CallOrderError,
    GraBError,
    GraBSampler,
    NonFiniteGradientError,
    ShapeError,
    StateDictError,
    UnitIndexError,
    UnsupportedInputError,
)

N, D = 10, 4


def snapshot(s):
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    return buf.getvalue(), s._yielded, s._stepped, s._epoch


def started(ordering):
    s = GraBSampler(n=N, ordering=ordering, seed=0)
    it = iter(s)
    for _ in range(N):
        next(it)
    s.step(np.ones((2, D), np.float32))
    return s


def with_value(value, dtype=np.float32, at=(1, 2), shape=(3, D)):
    def make():
        a = np.ones(shape, dtype=dtype)
        a[at] = value
        return a

    return make


def torch_with(value, dtype, at=(0, 3)):
    def make():
        t = torch.ones(3, D, dtype=dtype)
        t[at] = value
        return t

    return make


def segments_with_nan():
    return {"w": torch.ones(3, 2), "b": torch.tensor([[1.0, 1.0], [1.0, float("nan")], [1.0, 1.0]])}


def fortran():
    return np.asfortranarray(np.ones((3, D), np.float32))


# (name, gradients, indices, exception, message) -- for the balancing orderings
BALANCING_CASES = [
    ("NaN float64", with_value(np.nan, np.float64), None, NonFiniteGradientError, "NaN or Inf"),
    ("-Inf float32", with_value(-np.inf), None, NonFiniteGradientError, "NaN or Inf"),
    ("NaN float16", with_value(np.nan, np.float16), None, NonFiniteGradientError, "NaN or Inf"),
    ("Inf bfloat16", torch_with(float("inf"), torch.bfloat16), None, NonFiniteGradientError, "NaN or Inf"),
    ("Inf float16 torch", torch_with(float("-inf"), torch.float16), None, NonFiniteGradientError, "NaN or Inf"),
    ("NaN in the last row", with_value(np.nan, at=(2, 3)), None, NonFiniteGradientError, "row 2"),
    ("NaN in a later segment", segments_with_nan, None, NonFiniteGradientError, "NaN or Inf"),
    ("1-D gradients", lambda: np.ones(3, np.float32), None, ShapeError, "d = 4"),
    ("3-D of another width", lambda: np.ones((3, 2, 3), np.float32), None, ShapeError, "d = 4"),
]

# Checked in Python before anything reaches the native code: the same for every ordering.
COMMON_CASES = [
    ("bool", lambda: np.ones((2, D), bool), None, UnsupportedInputError, "dtype bool"),
    ("int64 torch", lambda: torch.ones(2, D, dtype=torch.int64), None, UnsupportedInputError, "torch.int64"),
    ("uint8", lambda: np.ones((2, D), np.uint8), None, UnsupportedInputError, "dtype uint8"),
    ("complex numpy", lambda: np.ones((2, D), np.complex64), None, UnsupportedInputError, "complex64"),
    ("object array", lambda: np.array([[1.0, None]], dtype=object), None, UnsupportedInputError, "object"),
    ("a string", lambda: "grads", None, UnsupportedInputError, "str"),
    ("None", lambda: None, None, UnsupportedInputError, "NoneType"),
    ("column slice", lambda: np.ones((2, 2 * D), np.float32)[:, ::2], None, UnsupportedInputError, "not C-contiguous"),
    ("fortran order", fortran, None, UnsupportedInputError, "not C-contiguous"),
    ("negative row stride", lambda: np.ones((3, D), np.float32)[::-1], None, UnsupportedInputError, "not C-contiguous"),
    (
        "negative column stride",
        lambda: np.ones((2, D), np.float32)[:, ::-1],
        None,
        UnsupportedInputError,
        "not C-contiguous",
    ),
    ("expanded torch", lambda: torch.ones(1, D).expand(3, D), None, UnsupportedInputError, "not contiguous"),
    (
        "channels-last torch",
        lambda: torch.ones(2, 3, 2, 2).to(memory_format=torch.channels_last),
        None,
        UnsupportedInputError,
        "not contiguous",
    ),
    ("sparse torch", lambda: torch.ones(2, D).to_sparse(), None, UnsupportedInputError, "layout"),
    ("meta device", lambda: torch.ones(2, D, device="meta"), None, UnsupportedInputError, "on meta"),
    ("zero rows torch", lambda: torch.ones(0, D), None, ShapeError, "0 rows"),
    ("zero rows and width", lambda: np.ones((0, 0), np.float32), None, ShapeError, "0 rows"),
    ("all segments empty", lambda: [np.ones((2, 0), np.float32)] * 2, None, ShapeError, "d = 0"),
    (
        "rows differ across segments",
        lambda: {"a": torch.ones(2, 2), "b": torch.ones(1, 2)},
        None,
        ShapeError,
        "leading dimension",
    ),
    ("more rows than pending", lambda: np.ones((N, D), np.float32), None, ShapeError, "only 8 indices are pending"),
    ("2-D indices", lambda: np.ones((2, D), np.float32), [[1, 2]], UnitIndexError, "1-D"),
    ("float indices", lambda: np.ones((2, D), np.float32), [1.0, 2.0], UnitIndexError, "integers"),
    ("indices too few", lambda: np.ones((3, D), np.float32), [4, 5], ShapeError, "3 rows but 2 indices"),
    ("index too large", lambda: np.ones((1, D), np.float32), [N], UnitIndexError, f"[0, {N})"),
    ("torch index negative", lambda: np.ones((1, D), np.float32), torch.tensor([-2]), UnitIndexError, f"[0, {N})"),
]


def check_refused(s, grads, indices, exc, message):
    before = snapshot(s)
    with pytest.raises(exc, match=re.escape(message)) as info:
        s.step(grads, indices=indices)
    assert isinstance(info.value, GraBError)
    assert snapshot(s) == before


@pytest.mark.parametrize("ordering", ["grab", "pair"])
@pytest.mark.parametrize(
    "name,make,indices,exc,message", BALANCING_CASES + COMMON_CASES, ids=[c[0] for c in BALANCING_CASES + COMMON_CASES]
)
def test_balancing_orderings_refuse_and_keep_state(ordering, name, make, indices, exc, message):
    s = started(ordering)
    check_refused(s, make(), indices, exc, message)
    s.step(np.ones((2, D), np.float32))  # still usable


@pytest.mark.parametrize("ordering", ["rr", "so", "wr", "fixed", "flipflop"])
@pytest.mark.parametrize("name,make,indices,exc,message", COMMON_CASES, ids=[c[0] for c in COMMON_CASES])
def test_other_orderings_refuse_and_keep_state(ordering, name, make, indices, exc, message):
    check_refused(started(ordering), make(), indices, exc, message)


@pytest.mark.parametrize("ordering", ["rr", "flipflop"])
def test_orderings_without_gradients_ignore_values(ordering):
    s = started(ordering)
    s.step(with_value(np.nan)())  # the values are never read: only the queue advances
    assert s._stepped == 5


def test_nan_refusal_mid_pair_keeps_the_open_pair():
    s = GraBSampler(n=N, ordering="pair", seed=0)
    it = iter(s)
    [next(it) for _ in range(N)]
    s.step(np.ones((3, D), np.float32))  # leaves one unit waiting for its partner
    before = snapshot(s)
    bad = np.ones((2, D), np.float32)
    bad[1, 0] = np.nan
    with pytest.raises(NonFiniteGradientError):
        s.step(bad)
    assert snapshot(s) == before


# ------------------------------------------------------------------ calls in the wrong order
def test_wrong_call_orders():
    s = GraBSampler(n=N, ordering="grab", seed=0)
    with pytest.raises(CallOrderError, match="before the sampler was iterated"):
        s.skip(1)
    it = iter(s)  # lazy: no epoch has begun yet
    with pytest.raises(CallOrderError, match="before the sampler was iterated"):
        s.step(np.ones((1, D), np.float32))
    next(it)
    before = snapshot(s)
    with pytest.raises(ShapeError, match="only 1 indices are pending"):
        s.skip(2)
    assert snapshot(s) == before
    for bad in (-1, 1.0, "1", True, None):  # before, skip(-1) was taken and stepped the cursor back
        with pytest.raises(UnsupportedInputError, match="non-negative integer"):
            s.skip(bad)
        assert snapshot(s) == before
    with pytest.raises(UnsupportedInputError, match="non-negative"):
        s.set_epoch(-1)
    # An iterator made stale by a load ends; it never yields from the loaded epoch.
    s.step(np.ones((1, D), np.float32))
    state = s.state_dict()
    it2 = iter(s)
    s.load_state_dict(state)
    with pytest.raises(StopIteration):
        next(it)
    assert list(it2) == s._order[1:].tolist()  # made before the load, begun after it: resumes it
    # A loaded iterator state that does not fit the sampler is refused.
    s.load_state_dict(state)
    it3 = iter(s)
    with pytest.raises(StateDictError, match="does not fit"):
        it3.load_state_dict({"epochs_begun": s._native.epochs_begun, "yielded": N + 5})
    with pytest.raises(StateDictError, match="malformed"):
        it3.load_state_dict({"yielded": 1})


def test_finite_gradients_that_overflow_float32_sums_are_refused_whole():
    """+-3e38 is finite in float32, but a pair difference of 6e38 is not: the step is refused and the
    sums stay finite (a float64 state holds them)."""
    v = np.full((8, D), 3e38, np.float32)
    v[::2] *= -1
    s = GraBSampler(n=8, ordering="pair", seed=0)
    order = list(s)
    before = snapshot(s)
    with pytest.raises(NonFiniteGradientError, match="range"):
        s.step(v[order])
    assert snapshot(s) == before
    s64 = GraBSampler(n=8, ordering="pair", seed=0, dtype=torch.float64)
    s64.step(v[list(s64)])
