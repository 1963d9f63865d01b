"""The training-loop edge cases of the README's "Behaviour in edge cases" section, one test each."""

import itertools
import tracemalloc

import numpy as np
import pytest
import torch
import torchgrab
from torch.utils.data import BatchSampler, DataLoader, TensorDataset
from torchgrab import GraBSampler, ShapeError, UnitIndexError

ORDERINGS = [o for o in torchgrab.orderings() if o != "mean"]


def data(n=23, d=3):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, d, generator=g), torch.arange(n))


def is_perm(order, n):
    return sorted(order) == list(range(n))


def test_workers_with_prefetch_resume_exactly_from_the_sampler_state():
    """A plain DataLoader with workers runs ahead; sampler.state_dict() taken after a step resumes from
    the last stepped index, so the prefetched batches are delivered again and nothing is lost."""
    ds = data()

    def run(state=None, stop=None, epochs=2):
        s = GraBSampler(ds, ordering="grab", seed=0)
        if state is not None:
            s.load_state_dict(state)
        dl = DataLoader(ds, batch_size=4, sampler=s, num_workers=2, prefetch_factor=3)
        seen, k = [], 0
        for _ in range(epochs):
            for x, idx in dl:
                s.step(x)
                seen.extend(idx.tolist())
                if k == stop:
                    assert s.pending > 0  # the workers had prefetched beyond this batch
                    return seen, s.state_dict()
                k += 1
        return seen, None

    ref, _ = run()
    head, state = run(stop=2)
    tail, _ = run(state=state, epochs=2)
    assert head + tail == ref


def test_drop_last_leaves_the_tail_unstepped_in_the_middle():
    ds = data(n=10)
    s = GraBSampler(ds, ordering="grab", seed=0, first_epoch="identity")
    dl = DataLoader(ds, batch_size=4, sampler=s, drop_last=True)
    for x, _ in dl:
        s.step(x)
    assert s.pending == 2  # indices 8 and 9 were yielded, dropped by the loader, never stepped
    nxt = list(s)
    assert is_perm(nxt, 10)
    # Unstepped units keep their relative order between the front (+) and back (-) blocks.
    pos = [nxt.index(8), nxt.index(9)]
    assert pos[0] + 1 == pos[1]


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_early_break_then_next_epoch(ordering):
    ds = data()
    s = GraBSampler(ds, ordering=ordering, seed=0)
    dl = DataLoader(ds, batch_size=5, sampler=s)
    for k, (x, _) in enumerate(dl):
        s.step(x)
        if k == 1:
            break
    nxt = []
    for x, idx in dl:
        s.step(x)
        nxt.extend(idx.tolist())
    assert len(nxt) == 23 and (ordering == "wr" or is_perm(nxt, 23))


def test_partial_last_batch_and_batch_sampler():
    ds = data(n=10)
    s = GraBSampler(ds, ordering="pair", seed=0)
    dl = DataLoader(ds, batch_sampler=BatchSampler(s, batch_size=3, drop_last=False))
    for _ in range(2):
        sizes = []
        for x, _ in dl:
            s.step(x)
            sizes.append(len(x))
        assert sizes == [3, 3, 3, 1]
        assert s.pending == 0


@pytest.mark.parametrize("ordering", ORDERINGS)
def test_n_equal_one(ordering):
    s = GraBSampler(n=1, ordering=ordering, seed=0)
    for _ in range(3):
        assert list(s) == [0]
        s.step(np.ones((1, 2), np.float32))


@pytest.mark.parametrize("make", [lambda: GraBSampler(n=0), lambda: GraBSampler([]), lambda: GraBSampler(data(n=0))])
def test_n_equal_zero_is_a_clear_error(make):
    with pytest.raises(ShapeError, match=r"empty \(n = 0\)"):
        make()


def test_indices_are_counted_across_chunks_and_a_stale_iterator_stops_mid_chunk():
    # The epoch iterator hands out chunks of 8,192 indices at C speed; the sampler counts what was
    # taken from the chunk in hand (pending, state_dict) and stops it when a newer epoch begins.
    n = 20_000
    s = GraBSampler(n=n, ordering="grab", seed=0)
    it = iter(s)
    first = list(itertools.islice(it, 8_192 + 5))
    assert s.pending == 8_197 and it.state_dict()["yielded"] == 8_197
    assert first == s._order[:8_197].tolist()
    s.step(np.ones((8_197, 2), np.float32))
    assert s.pending == 0
    assert next(it) == s._order[8_197] and s.pending == 1
    it2 = iter(s)
    second = next(it2)  # a newer epoch begins: `it` is stale in the middle of its chunk
    with pytest.raises(StopIteration):
        next(it)
    assert s.pending == 1 and second == s._order[0]
    rest = list(it2)
    assert sorted([second, *rest]) == list(range(n)) and s.pending == n


def test_an_error_between_chunks_is_raised_by_next_and_the_next_next_continues():
    # A background step the kernel refused raises at the sampler's next call. When that call is the
    # iterator taking its next chunk, next() raises it, and the iterator goes on at the next next().
    n = 20_000
    s = GraBSampler(n=n, ordering="grab", seed=0)
    it = iter(s)
    head = list(itertools.islice(it, 8_192))  # the whole first chunk
    s.step(np.ones((8_128, 1 << 10), np.float32))
    bad = np.full((64, 1 << 10), np.nan, np.float32)  # 2^16 elements: balanced in the background
    s.step(bad, non_blocking=True)  # the chunk's last 64 indices: refused in the background
    with pytest.raises(torchgrab.NonFiniteGradientError):
        next(it)
    assert s.pending == 64  # the refused step changed nothing
    rest = list(itertools.islice(it, 3))
    assert head + rest == s._order[: 8_192 + 3].tolist() and s.pending == 67


def test_large_n_keeps_compact_memory_and_yields_at_once():
    n = 3_000_000
    s = GraBSampler(n=n, ordering="grab", seed=0)
    it = iter(s)
    tracemalloc.start()
    first = [next(it) for _ in range(10)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Python-side memory for the first indices is one chunk, not a list of n ints (which is >100 MB).
    assert peak < 2_000_000, peak
    assert s._cursor.chunk_size <= 1 << 13
    assert len(set(first)) == 10
    # Rust side: the u32 order and the u32 assembly buffer plus a bitmap, nothing per unit beyond that.
    assert s.state_bytes <= n * 4 * 2 + n // 8 + 64
    assert s._order.dtype == np.uint32 and s._order.shape == (n,)


def test_step_twice_for_one_batch():
    s = GraBSampler(n=8, ordering="grab", seed=0)
    it = iter(s)
    idx = [next(it) for _ in range(4)]
    rows = np.ones((4, 2), np.float32)
    s.step(rows)
    with pytest.raises(ShapeError, match="only 0 indices are pending"):
        s.step(rows)  # FIFO: nothing is pending any more
    with pytest.raises(UnitIndexError, match="already received"):
        s.step(rows, indices=idx)  # explicit indices: the unit was balanced this epoch
    assert s._stepped == 4


def test_step_twice_with_prefetch_needs_indices():
    """With batches prefetched, a repeated FIFO step would take the next batch's indices; passing the
    batch's indices makes the repeat an error instead."""
    ds = data(n=16)
    s = GraBSampler(ds, ordering="grab", seed=0)
    dl = DataLoader(ds, batch_size=4, sampler=s, num_workers=1, prefetch_factor=2)
    for x, idx in dl:
        s.step(x, indices=idx)
        with pytest.raises(UnitIndexError, match="already received"):
            s.step(x, indices=idx)


@pytest.mark.parametrize("ordering", ["grab", "pair"])
def test_no_step_at_all_keeps_the_order(ordering):
    s = GraBSampler(n=9, ordering=ordering, seed=0)
    first = list(s)
    assert list(s) == first  # nothing was stepped: every unit stays in the middle, in order


def test_skip_marks_a_batch_without_gradients():
    s = GraBSampler(n=6, ordering="grab", seed=0, first_epoch="identity")
    it = iter(s)
    [next(it) for _ in range(6)]
    s.skip(2)
    s.step(np.array([[1.0], [1.0], [-1.0], [-1.0]]))
    nxt = list(s)
    assert is_perm(nxt, 6)
    # Signs +, -, +, - for units 2..5 (front 2, 4; back 5, 3); 0 and 1 had none: they sit in the middle.
    assert nxt == [2, 4, 0, 1, 5, 3]


def test_pending_indices_do_not_cross_an_epoch_boundary():
    s = GraBSampler(n=6, ordering="grab", seed=0)
    it = iter(s)
    [next(it) for _ in range(6)]
    s.step(np.ones((4, 2), np.float32))  # two indices of epoch 0 left pending
    it2 = iter(s)
    new = [next(it2) for _ in range(2)]
    assert s.pending == 2 and s._stepped == 0  # the old pending ones were dropped unstepped
    with pytest.raises(ShapeError, match="only 2 indices are pending"):
        s.step(np.ones((4, 2), np.float32))  # a step spanning the boundary is refused
    s.step(np.ones((2, 2), np.float32))
    assert s._order[:2].tolist() == new
    with pytest.raises(StopIteration):
        next(it)  # the old epoch's iterator is stale
