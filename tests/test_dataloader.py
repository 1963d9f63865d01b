"""The sampler inside a real DataLoader: prefetching workers, drop_last, early break, BatchSampler."""

import numpy as np
import pytest
import torch
from conftest import is_permutation
from torch.utils.data import BatchSampler, DataLoader, TensorDataset
from torchgrab import GraBSampler


def make_data(n=103, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    idx = torch.arange(n)
    return TensorDataset(x, idx)


@pytest.mark.parametrize("ordering", ["grab", "pair", "rr"])
def test_workers_drop_last_and_early_break_keep_permutations(ordering):
    ds = make_data()
    n = len(ds)
    sampler = GraBSampler(ds, ordering=ordering, seed=1)
    loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=2, drop_last=True, prefetch_factor=2)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        seen = []
        for k, (x, idx) in enumerate(loader):
            # FIFO matching: the rows the loader delivered are the indices the sampler pends first.
            sampler.step(x)  # the rows themselves serve as "gradients"
            seen.extend(idx.tolist())
            if epoch == 2 and k == 4:
                break  # early break mid-epoch, with batches prefetched by the workers
        assert len(set(seen)) == len(seen)
        order = sampler._order.tolist()
        assert is_permutation(order, n)
        assert seen == order[: len(seen)]
    assert is_permutation(list(sampler), n)


def test_fifo_rows_match_yielded_indices_with_prefetching():
    ds = make_data(n=64)
    sampler = GraBSampler(ds, ordering="grab", seed=0)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, prefetch_factor=4)
    for x, idx in loader:
        assert sampler.pending >= len(idx)  # the sampler ran ahead of the training loop
        expected = sampler._order[sampler._stepped : sampler._stepped + len(idx)].tolist()
        assert idx.tolist() == expected
        sampler.step(x)


def test_inside_a_batch_sampler():
    ds = make_data(n=30)
    sampler = GraBSampler(ds, ordering="pair", seed=0)
    loader = DataLoader(ds, batch_sampler=BatchSampler(sampler, batch_size=7, drop_last=False))
    for _ in range(3):
        got = []
        for x, idx in loader:
            sampler.step(x)
            got.extend(idx.tolist())
        assert is_permutation(got, 30)


def test_len_is_exact_and_n_one_works():
    assert len(GraBSampler(n=17)) == 17
    s = GraBSampler(n=1, ordering="pair")
    for _ in range(3):
        assert list(s) == [0]
        s.step(np.ones((1, 3)))


@pytest.mark.parametrize("workers", [0, 1])
def test_set_epoch_naming_the_epoch_already_begun_keeps_the_next_ones_number(workers):
    """A loader with workers fetches indices as soon as its iterator is made, and Lightning makes the first
    (or a resumed) epoch's iterator before it calls set_epoch for that epoch. That late call names the
    epoch already running: the next epoch must still be numbered after it, or RR repeats its order."""
    ds = make_data(n=40)
    late = GraBSampler(ds, ordering="rr", seed=3)
    loader = DataLoader(ds, batch_size=8, sampler=late, num_workers=workers)
    it = iter(loader)
    first = next(it)[1].tolist()
    late.set_epoch(0)  # late, as Lightning does with workers
    late.set_epoch(0)  # and again (GraBCallback's on_train_epoch_start)
    first += [i for _, idx in it for i in idx.tolist()]
    assert late.state_dict()["epoch"] == 1
    late.set_epoch(1)  # on time
    second = [i for _, idx in loader for i in idx.tolist()]

    on_time = GraBSampler(ds, ordering="rr", seed=3)
    expected = []
    for epoch in range(2):
        on_time.set_epoch(epoch)
        expected.append(list(on_time))
    assert [first, second] == expected and first != second

    # Without the second set_epoch the next epoch is numbered 2 by itself, after the late call as after none.
    again = [i for _, idx in loader for i in idx.tolist()]
    on_time.set_epoch(2)
    assert again == list(on_time)
    # Any other number, and the running epoch's own number once another was set, still take effect.
    late.set_epoch(7)
    late.set_epoch(2)
    assert late.state_dict()["epoch"] == 2


def test_set_epoch_naming_an_epoch_left_before_its_end_begins_it_again():
    # A Trainer that retries an epoch (transformers' auto_find_batch_size after an out-of-memory batch)
    # calls set_epoch(e) again and makes a new iterator: epoch e begins again, with the same RR order.
    s = GraBSampler(n=20, ordering="rr", seed=3)
    s.set_epoch(0)
    it = iter(s)
    left = [next(it) for _ in range(5)]
    s.set_epoch(0)
    again = list(s)
    assert again[:5] == left and sorted(again) == list(range(20))
    assert s.state_dict()["epoch"] == 1
