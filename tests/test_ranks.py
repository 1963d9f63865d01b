"""RankShard: the batches of one shared GraBSampler dealt to W ranks (r, r + W, ...), the last round padded
from the epoch's start (or cut with drop_last); watch(all_ranks=True) without a process group."""

import pytest
import torch
from torch.utils.data import DistributedSampler
from torchgrab import GraBSampler, UnsupportedInputError
from torchgrab.integrations import RankShard


@pytest.mark.parametrize("n,b,w", [(37, 8, 2), (32, 8, 2), (10, 4, 3), (3, 4, 2)])
def test_rank_shards_deal_whole_batches_in_turn(n, b, w):
    shards = [RankShard(GraBSampler(n=n, seed=5), b, w, r) for r in range(w)]
    order = list(GraBSampler(n=n, seed=5))
    got = [list(s) for s in shards]
    assert all(len(g) == len(s) for g, s in zip(got, shards))
    batches = [order[i : i + b] for i in range(0, n, b)]
    for r in range(w):
        for j, batch in enumerate(batches[r::w]):
            assert got[r][j * b : j * b + len(batch)] == batch
    assert set().union(*map(set, got)) == set(range(n))
    assert all(isinstance(s, DistributedSampler) for s in shards)  # what Lightning leaves alone


def test_drop_last_keeps_whole_rounds_only():
    shards = [RankShard(GraBSampler(n=37, seed=1), 8, 2, r, drop_last=True) for r in range(2)]
    got = [list(s) for s in shards]
    assert [len(g) for g in got] == [16, 16]
    assert len(set(got[0]) | set(got[1])) == 32
    with pytest.raises(Exception, match="no full round"):
        RankShard(GraBSampler(n=10, seed=1), 8, 2, 0, drop_last=True)


def test_set_epoch_and_state_reach_the_shared_sampler():
    inner = GraBSampler(n=12, seed=3, ordering="rr")
    shard = RankShard(inner, 2, 2, 1)
    shard.set_epoch(4)
    first = list(shard)
    twin = GraBSampler(n=12, seed=3, ordering="rr")
    twin.set_epoch(4)
    order = list(twin)
    assert first == [i for j in range(1, 6, 2) for i in order[2 * j : 2 * j + 2]]
    assert shard.state_dict()["epoch"] == inner.state_dict()["epoch"]


def test_all_ranks_without_a_process_group_is_one_rank():
    model = torch.nn.Linear(3, 2)
    s = GraBSampler(n=8, seed=0)
    s.watch(model, all_ranks=True)
    for i in iter(torch.utils.data.BatchSampler(s, 4, False)):
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3)), torch.tensor(i) % 2).backward()
    assert s.pending == 0
    with pytest.raises(UnsupportedInputError, match="all_ranks"):
        GraBSampler(n=8).watch(model, all_ranks=True, granularity="batch")
    with pytest.raises(UnsupportedInputError, match="all_ranks"):
        GraBSampler(n=8).watch(model, all_ranks="yes")
