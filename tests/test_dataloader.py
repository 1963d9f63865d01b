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
