"""DistributedGraBSampler: DistributedSampler's contract, and CD-GraB on real gloo process groups.

The multi-process tests start their own ranks on localhost (torch.multiprocessing.spawn, a free port,
gloo with a short timeout) and compare every epoch's orders with a plain single-process simulation of
CD-GraB written below from GRAB.md's definition.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import socket
import tempfile
import warnings
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchgrab
from conftest import save_load
from torch.utils.data import DistributedSampler
from torchgrab import DistributedGraBSampler

D = 6


# ---------------------------------------------------------------- the simulation (GRAB.md, "Distributed: CD-GraB")
def grad_of(i: int, epoch: int) -> np.ndarray:
    """A fixed gradient for data set index i in epoch e (what a model would produce)."""
    return np.random.default_rng(1000 * epoch + i).standard_normal(D)


def simulate_epoch(orders, steps, epoch, mode):
    """One epoch of CD-GraB. `orders[w]` = shard w's visit order (data set indices), `steps` = rows per step.
    exact: every shard's pairs in rank order, each signed against the one running sum.
    efficient: each shard signs its pairs against s at the step start plus its own earlier pairs; then s
    advances by every shard's signed sum. Returns each shard's next order and the final s."""
    w_count = len(orders)
    s = np.zeros(D)
    front = [[] for _ in range(w_count)]
    back = [[] for _ in range(w_count)]
    pending = [None] * w_count
    pos = 0
    for rows in steps:
        s0 = s.copy()
        total = np.zeros(D)
        for w in range(w_count):
            units = ([pending[w]] if pending[w] is not None else []) + list(orders[w][pos : pos + rows])
            local = s0.copy()
            for k in range(len(units) // 2):
                a, b = units[2 * k], units[2 * k + 1]
                z = grad_of(a, epoch) - grad_of(b, epoch)
                ref = s if mode == "exact" else local
                eps = 1.0 if ref @ z <= 0 else -1.0
                if mode == "exact":
                    s = s + eps * z
                else:
                    local = local + eps * z
                    total = total + eps * z
                front[w].append(a if eps > 0 else b)
                back[w].append(b if eps > 0 else a)
            pending[w] = units[-1] if len(units) % 2 else None
        if mode == "efficient":
            s = s0 + total
        pos += rows
    nxt = []
    for w in range(w_count):
        placed = set(front[w]) | set(back[w])
        middle = [i for i in orders[w] if i not in placed]
        nxt.append(front[w] + middle + back[w][::-1])
    return nxt, s


# ---------------------------------------------------------------- DistributedSampler's contract (no process group)
@pytest.mark.parametrize("n", [1, 7, 10, 12, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_first_epoch_and_sizes_match_distributed_sampler(n, world, drop_last):
    if drop_last and n < world:
        with pytest.raises(torchgrab.ShapeError):
            DistributedGraBSampler(range(n), num_replicas=world, rank=0, drop_last=drop_last)
        return
    ours, theirs = [], []
    for rank in range(world):
        a = DistributedGraBSampler(range(n), num_replicas=world, rank=rank, seed=3, drop_last=drop_last)
        b = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=3, drop_last=drop_last)
        assert (len(a), a.num_samples, a.total_size) == (len(b), b.num_samples, b.total_size)
        ours.append(list(a))
        theirs.append(list(b))
    # Same seed, same padding rules: the first epoch is DistributedSampler's epoch 0, index for index.
    assert ours == theirs


def test_invalid_rank_is_a_value_error():
    for rank in (-1, 2, 5):
        with pytest.raises(ValueError, match="Invalid rank"):
            DistributedGraBSampler(range(10), num_replicas=2, rank=rank)
    with pytest.raises(torchgrab.UnsupportedInputError):
        DistributedGraBSampler(range(10), num_replicas=2, rank=0, ordering="grab")
    with pytest.raises(torchgrab.UnsupportedInputError):
        DistributedGraBSampler(range(10), num_replicas=2, rank=0, mode="fast")


def test_single_replica_is_pair_balance_and_efficient_equals_exact():
    """W = 1: both modes are plain pair balance (no cross-rank terms exist), equal to the simulation."""
    n, steps = 9, [3, 3, 3]
    for mode in ("exact", "pipelined", "efficient"):
        s = DistributedGraBSampler(range(n), num_replicas=1, rank=0, mode=mode)
        s.set_epoch(0)
        order = list(s)
        for epoch in range(2):
            pos = 0
            for rows in steps:
                s.step(torch.from_numpy(np.stack([grad_of(i, epoch) for i in order[pos : pos + rows]])))
                pos += rows
            want, s_want = simulate_epoch([order], steps, epoch, "efficient" if mode == "efficient" else "exact")
            np.testing.assert_allclose(s.running_sum, s_want, rtol=1e-12, atol=1e-12)
            order = list(s)
            assert order == want[0]


def test_stepping_several_replicas_needs_a_process_group():
    s = DistributedGraBSampler(range(8), num_replicas=2, rank=1)
    next(iter(s))
    with pytest.raises(torchgrab.CallOrderError, match="init_process_group"):
        s.step(torch.zeros(1, 3))


def test_step_refusals_leave_the_state_unchanged():
    s = DistributedGraBSampler(range(8), num_replicas=1, rank=0)
    with pytest.raises(torchgrab.CallOrderError):
        s.step(torch.zeros(2, 3))
    it = iter(s)
    for _ in range(4):
        next(it)
    before = s.replica_bytes()
    with pytest.raises(torchgrab.ShapeError):
        s.step(torch.zeros(5, 3))  # only 4 yielded
    bad = torch.zeros(2, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(torchgrab.NonFiniteGradientError):
        s.step(bad)
    assert s.replica_bytes() == before
    s.step(torch.ones(2, 3))
    with pytest.raises(torchgrab.ShapeError, match="d = 3"):
        s.step(torch.ones(2, 4))


def _replicas_global_order(vectors, world, b, epochs, mode, seed):
    """W order-server replicas in one process (what W ranks compute); the last epoch's global order."""
    n = len(vectors)
    m = n // world
    shards = np.random.default_rng(seed).permutation(n)[: m * world].reshape(m, world).T
    reps = [torchgrab._native.NativeCoordinated(world, r, m) for r in range(world)]
    rng = np.random.default_rng(seed + 1)
    for epoch in range(epochs + 1):
        orders = [rng.permutation(m) for _ in reps] if mode == "rr" else [r.begin_epoch() for r in reps]
        if epoch == epochs or mode == "rr":
            continue
        for lo in range(0, m, b):
            rows = [np.ascontiguousarray(vectors[shards[w][orders[w][lo : lo + b]]]) for w in range(world)]
            if mode == "exact":
                gathered = np.concatenate([r.local_diffs([x], "float64") for r, x in zip(reps, rows)])
                for r, x in zip(reps, rows):
                    r.step_exact([x], "float64", gathered)
            else:
                gathered = np.concatenate([r.local_stats([x], "float64") for r, x in zip(reps, rows)])
                total = sum(r.decide([x], "float64", gathered) for r, x in zip(reps, rows))
                for r in reps:
                    r.add_sum(total)
        assert len({r.replica_bytes() for r in reps}) == 1
    return np.concatenate([shards[w][orders[w][lo : lo + b]] for lo in range(0, m, b) for w in range(world)])


@pytest.mark.parametrize("seed", [0, 1])
def test_both_modes_balance_far_better_than_random_reshuffling(seed):
    """Herding discrepancy of the global (step-major) order on fixed vectors: the efficient mode's
    approximation stays close to exact CD-GraB, and both are far below random reshuffling."""
    v = np.random.default_rng(seed).standard_normal((512, 16))
    disc = {
        mode: torchgrab.herding_discrepancy(v, _replicas_global_order(v, 4, 8, 4, mode, seed)).l2
        for mode in ("rr", "exact", "efficient")
    }
    assert disc["exact"] < 0.5 * disc["rr"]
    assert disc["efficient"] < 0.5 * disc["rr"]
    assert disc["efficient"] < 1.5 * disc["exact"]


# ---------------------------------------------------------------- the baselines rr and so (no process group)
def _reference_epoch(n, world, seed, epoch, drop_last):
    """DistributedSampler(shuffle=True)'s rule written out: randperm from seed + epoch, padded from the
    front (or cut), dealt indices[rank::W]. Returns every rank's list."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    if drop_last and n % world:
        total = (n // world) * world
        perm = perm[:total]
    else:
        total = -(-n // world) * world
        perm = (perm * (total // n + 1))[:total]
    return [perm[r::world] for r in range(world)]


def test_baselines_by_hand():
    # n = 5, W = 2: the padded list is the permutation plus its first index; rank r takes every
    # second entry from r. rr draws that permutation from seed + epoch, so repeats epoch e's every epoch.
    for epoch in range(3):
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(4 + epoch)).tolist()
        padded = perm + perm[:1]
        for rank in range(2):
            rr = DistributedGraBSampler(range(5), num_replicas=2, rank=rank, ordering="rr", seed=4)
            so = DistributedGraBSampler(range(5), num_replicas=2, rank=rank, ordering="so", seed=4)
            rr.set_epoch(epoch)
            so.set_epoch(epoch)
            assert list(rr) == padded[rank::2]
            first = torch.randperm(5, generator=torch.Generator().manual_seed(4)).tolist()
            assert list(so) == (first + first[:1])[rank::2]


@pytest.mark.parametrize("n", [1, 7, 10, 13])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rr_is_distributed_sampler_and_so_repeats_its_first_epoch(n, world, drop_last):
    if drop_last and n < world:
        return
    seed = 5
    make = lambda rank, ordering: DistributedGraBSampler(  # noqa: E731
        range(n), num_replicas=world, rank=rank, ordering=ordering, seed=seed, drop_last=drop_last
    )
    rr = [make(r, "rr") for r in range(world)]
    so = [make(r, "so") for r in range(world)]
    pair = [make(r, "pair") for r in range(world)]
    torch_rr = [
        DistributedSampler(range(n), num_replicas=world, rank=r, seed=seed, drop_last=drop_last) for r in range(world)
    ]
    first = [list(p) for p in pair]  # the pair mode's first epoch: the shards so shares with it
    epochs = []
    for epoch in range(4):
        for s in rr + so + torch_rr:
            s.set_epoch(epoch)
        got_rr, got_so = [list(s) for s in rr], [list(s) for s in so]
        want = _reference_epoch(n, world, seed, epoch, drop_last)
        assert got_rr == want == [list(s) for s in torch_rr]
        assert got_so == first == _reference_epoch(n, world, seed, 0, drop_last)
        for got in (got_rr, got_so):
            # Each epoch's shards together are the padded (or cut) data set: every index, as often as
            # DistributedSampler's padding repeats it, and each rank num_samples of them.
            assert all(len(o) == rr[0].num_samples for o in got)
            union = Counter(i for o in got for i in o)
            assert sum(union.values()) == rr[0].total_size
            if not drop_last:
                assert set(union) == set(range(n))
            else:
                assert all(c == 1 for c in union.values())
        epochs.append(got_rr)
    if n >= 7:
        assert any(e != epochs[0] for e in epochs[1:]), "rr never reshuffled"


def test_rr_warns_when_an_epoch_repeats_its_number():
    s = DistributedGraBSampler(range(9), num_replicas=1, rank=0, ordering="rr")
    a = list(s)
    with pytest.warns(UserWarning, match="set_epoch"):
        b = list(s)
    assert a == b  # what DistributedSampler does too without set_epoch
    s.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(s) != a
        DistributedGraBSampler(range(9), num_replicas=1, rank=0, ordering="so").__iter__()


def test_baseline_step_counts_rows_without_a_process_group():
    # num_replicas = 2 and no process group: rr/so step() needs no collective, so it works here.
    for ordering in ("rr", "so"):
        s = DistributedGraBSampler(range(12), num_replicas=2, rank=1, ordering=ordering)
        with pytest.raises(torchgrab.CallOrderError):
            s.step(torch.zeros(1, 3))
        it = iter(s)
        [next(it) for _ in range(4)]
        s.step(torch.zeros(2, 3))
        s.step({"w": np.zeros((1, 2, 2)), "b": torch.zeros(1)})  # a dict of per-parameter rows
        with pytest.raises(torchgrab.ShapeError, match="only 1 yielded"):
            s.step(torch.zeros(2, 3))
        with pytest.raises(torchgrab.ShapeError, match="different numbers of rows"):
            s.step([torch.zeros(1, 3), torch.zeros(2)])
        with pytest.raises(torchgrab.ShapeError):
            s.step(3)
        assert s.stepped == 3
        with pytest.raises(torchgrab.UnsupportedInputError, match="no order server"):
            s.replica_bytes()
        with pytest.raises(torchgrab.UnsupportedInputError, match="no order server"):
            _ = s.running_sum
        # backward all-reduces the gradient: with 2 replicas it needs the process group, and refuses
        # before touching the model or the cursor.
        model = torch.nn.Linear(3, 2)
        with pytest.raises(torchgrab.CallOrderError, match="init_process_group"):
            s.backward(model, torch.nn.CrossEntropyLoss(), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
        assert s.stepped == 3 and model.weight.grad is None


def test_baseline_backward_is_an_ordinary_backward_with_one_replica():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model[0].bias.requires_grad_(False)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(5, D), torch.randint(0, 3, (5,))
    loss_fn(model(x), y).backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    for ordering in ("rr", "so"):
        s = DistributedGraBSampler(range(8), num_replicas=1, rank=0, ordering=ordering)
        it = iter(s)
        [next(it) for _ in range(5)]
        model.zero_grad(set_to_none=True)
        loss = s.backward(model, loss_fn, x, y)
        torch.testing.assert_close(loss, loss_fn(model(x), y))
        for k, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, want[k])
            else:
                assert p.grad is None
        assert s.stepped == 5
        with pytest.raises(torchgrab.ShapeError, match="only 0 yielded"):
            s.backward(model, loss_fn, x[:1], y[:1])


def _play_baseline(make, steps, epochs, stop_after=None, prefetch=0, state=None):
    """The train loop of _run for rr/so: every consumed index in order; with ``stop_after``, the state
    dict after that step instead. With ``state``, a fresh sampler resumes from it (what a restarted
    loop does: set_epoch of the saved epoch when it was saved mid-epoch) and plays to the end."""
    sampler = make()
    log, k, first_epoch, skip = [], 0, 0, 0
    if state is not None:
        sampler.load_state_dict(save_load(state))
        k = state["_steps_done"]
        first_epoch, skip = divmod(k, len(steps))
    for epoch in range(first_epoch, epochs):
        sampler.set_epoch(epoch)
        it, buffered = iter(sampler), []
        for rows in steps[skip if epoch == first_epoch else 0 :]:
            while len(buffered) < rows + prefetch:
                i = next(it, None)
                if i is None:
                    break
                buffered.append(i)
            batch, buffered = buffered[:rows], buffered[rows:]
            log.extend(batch)
            sampler.step(torch.zeros(len(batch), 2))
            k += 1
            if stop_after == k:
                return {**sampler.state_dict(), "_steps_done": k}, log
        assert not buffered and next(it, None) is None
    return None, log


@pytest.mark.parametrize("ordering", ["rr", "so"])
@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_baseline_resume_from_any_step_is_exact(ordering, world, rank, prefetch):
    n = 13
    make = lambda: DistributedGraBSampler(range(n), num_replicas=world, rank=rank, ordering=ordering, seed=3)  # noqa: E731
    steps = [3, 3, 1] if world == 2 else [3, 3, 3, 4]
    epochs = 3
    _, want = _play_baseline(make, steps, epochs)
    for stop in range(1, len(steps) * epochs):
        state, head = _play_baseline(make, steps, epochs, stop, prefetch)
        # The saved position: after the stepped rows, whatever the loader had prefetched.
        assert state["stepped"] == sum(steps[: (stop - 1) % len(steps) + 1])
        _, tail = _play_baseline(make, steps, epochs, state=state)
        assert head + tail == want, f"{ordering}: resume after step {stop} (prefetch {prefetch}) diverged"


@pytest.mark.parametrize("ordering", ["rr", "so"])
def test_baseline_resume_rules(ordering):
    def make():
        return DistributedGraBSampler(range(10), num_replicas=1, rank=0, ordering=ordering, seed=1)

    s = make()
    fresh = make()
    fresh.load_state_dict(s.state_dict())  # never iterated: the next __iter__ is epoch 0's
    assert list(fresh) == list(make())
    s.set_epoch(2)
    order = list(s)
    # Iterated to the end, nothing stepped: everything was yielded but not trained on, so a resume
    # hands the whole epoch out again (a loop that never steps resumes at its epoch's start).
    again = make()
    again.load_state_dict(s.state_dict())
    assert list(again) == order
    s.step(np.zeros((10, 1)))
    done = s.state_dict()
    nxt = make()
    nxt.load_state_dict(done)  # every row stepped, iteration at its end: the next epoch begins
    nxt.set_epoch(3)
    s.set_epoch(3)
    assert list(nxt) == list(s)
    same = make()
    same.load_state_dict(done)
    same.set_epoch(2)  # the saved epoch's own number: it continues (nothing left of it)
    assert list(same) == []


def test_refused_baseline_state_dicts_change_nothing():
    def make(ordering, **kw):
        return DistributedGraBSampler(range(12), num_replicas=1, rank=0, ordering=ordering, seed=2, **kw)

    states = {}
    for ordering in ("pair", "rr", "so"):
        s = make(ordering)
        order = list(s)
        s.step(torch.from_numpy(np.stack([grad_of(i, 0) for i in order[:4]])))
        states[ordering] = s.state_dict()
    # The pair mode's dict keeps exactly its version-1 entries; rr/so replace "server" by their cursor.
    common = {"format", "version", "n", "num_replicas", "rank", "ordering", "mode", "seed", "drop_last"}
    common |= {"epoch", "iterated", "yielded", "shards", "bytes_sent"}
    assert set(states["pair"]) == common | {"server"}
    assert set(states["rr"]) == set(states["so"]) == common | {"begun", "order_epoch", "stepped"}
    for ordering in ("rr", "so"):
        target = make(ordering)
        t_order = list(target)
        target.step(torch.zeros(1, 2))
        before = target.state_dict()
        good = states[ordering]
        bad = [(states[o], f"ordering={o!r}") for o in ("pair", "rr", "so") if o != ordering]
        bad += [
            ({**good, "version": 2}, "version"),
            ({**good, "seed": 5}, "seed=5"),
            ({**good, "stepped": 13}, "outside the shard"),
            ({**good, "yielded": 3}, "behind"),
            ({**good, "begun": False, "iterated": False}, "begun no epoch"),
            ({k: v for k, v in good.items() if k != "stepped"}, "malformed"),
            ({**good, "order_epoch": "x"}, "malformed"),
            ({**good, "shards": good["shards"].flip(1)}, "shards differ"),
        ]
        for state, match in bad:
            with pytest.raises(torchgrab.StateDictError, match=match):
                target.load_state_dict(state)
            after = target.state_dict()
            assert {k: v for k, v in after.items() if k != "shards"} == {
                k: v for k, v in before.items() if k != "shards"
            }
        # The mode plays no part in rr/so: a state saved under another mode loads.
        make(ordering, mode="efficient").load_state_dict(good)
        # Still usable where it was: the target's own epoch goes on.
        target.step(torch.zeros(2, 2))
        assert target.stepped == 3 and t_order
    for ordering in ("rr", "so"):
        with pytest.raises(torchgrab.StateDictError, match=f"ordering={ordering!r}"):
            make("pair").load_state_dict(states[ordering])


# ---------------------------------------------------------------- real process groups
# ---------------------------------------------------------------- checkpoints (one replica, no process group)
def _run(sampler, steps, epochs, log, stop_after=None, prefetch=0):
    """Train-loop stand-in: per epoch, iterate (``prefetch`` units ahead, like a DataLoader's workers)
    and step ``steps`` rows at a time with grad_of. Appends every index the loop consumes and, after every
    step, the replica bytes to ``log`` (prefetched units not yet consumed are not logged: a resume hands
    them out again). Returns the state dict taken after step ``stop_after`` (counted over the
    whole run), or None."""
    k = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        it = iter(sampler)
        buffered = []
        for rows in steps:
            while len(buffered) < rows + prefetch:
                try:
                    i = next(it)
                except StopIteration:
                    break
                buffered.append(i)
            batch, buffered = buffered[:rows], buffered[rows:]
            log.extend(("yield", i) for i in batch)  # what the training loop consumes
            sampler.step(torch.from_numpy(np.stack([grad_of(i, epoch) for i in batch])))
            log.append(("state", sampler.replica_bytes()))
            k += 1
            if stop_after == k:
                return sampler.state_dict()
        assert not buffered and next(it, None) is None
    return None


def _resume_run(state, steps, epochs, log, prefetch=0):
    fresh = DistributedGraBSampler(range(13), num_replicas=1, rank=0, seed=3)
    fresh.load_state_dict(save_load(state))
    k_done = sum(1 for e in log if e[0] == "state")
    # Continue inside the saved epoch, then the remaining epochs, exactly as the loop would have.
    per_epoch = len(steps)
    epoch, done_in_epoch = divmod(k_done, per_epoch)
    if done_in_epoch == 0:  # saved at an epoch's end: the loop goes on with the next epoch
        epoch, done_in_epoch = epoch - 1, per_epoch
    else:
        fresh.set_epoch(epoch)
    it = iter(fresh) if done_in_epoch < per_epoch else None
    for rows in steps[done_in_epoch:]:
        batch = [next(it) for _ in range(rows)]
        log.extend(("yield", i) for i in batch)
        fresh.step(torch.from_numpy(np.stack([grad_of(i, epoch) for i in batch])))
        log.append(("state", fresh.replica_bytes()))
    if done_in_epoch < per_epoch:
        assert next(it, None) is None
    for e in range(epoch + 1, epochs):
        fresh.set_epoch(e)
        it = iter(fresh)
        for rows in steps:
            batch = [next(it) for _ in range(rows)]
            log.extend(("yield", i) for i in batch)
            fresh.step(torch.from_numpy(np.stack([grad_of(i, e) for i in batch])))
            log.append(("state", fresh.replica_bytes()))
    return fresh


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_from_any_step_is_exact(prefetch):
    steps, epochs = [3, 3, 3, 4], 3  # odd steps: pairs straddle steps, so the open gradient is saved too
    full = []
    whole = DistributedGraBSampler(range(13), num_replicas=1, rank=0, seed=3)
    _run(whole, steps, epochs, full)
    want = [e for e in full if e[0] == "state"], [e[1] for e in full if e[0] == "yield"]
    for stop in range(1, len(steps) * epochs):
        log = []
        state = _run(
            DistributedGraBSampler(range(13), num_replicas=1, rank=0, seed=3), steps, epochs, log, stop, prefetch
        )
        resumed = _resume_run(state, steps, epochs, log, prefetch)
        got = [e for e in log if e[0] == "state"], [e[1] for e in log if e[0] == "yield"]
        assert got == want, f"resume after step {stop} (prefetch {prefetch}) diverged"
        np.testing.assert_array_equal(resumed.running_sum, whole.running_sum)


def test_state_dict_between_epochs_and_before_iterating():
    s = DistributedGraBSampler(range(10), num_replicas=1, rank=0, seed=1)
    fresh = DistributedGraBSampler(range(10), num_replicas=1, rank=0, seed=1)
    fresh.load_state_dict(s.state_dict())  # never iterated: the next __iter__ is epoch 0's
    assert list(fresh) == list(s)
    for epoch in range(2):
        s.set_epoch(epoch)
        order = list(s)
        for lo in range(0, 10, 2):
            s.step(torch.from_numpy(np.stack([grad_of(i, epoch) for i in order[lo : lo + 2]])))
    saved = s.state_dict()
    fresh.load_state_dict(saved)  # every unit stepped, iteration at its end: the next epoch begins
    assert list(fresh) == list(s)
    again = DistributedGraBSampler(range(10), num_replicas=1, rank=0, seed=1)
    again.load_state_dict(saved)
    again.set_epoch(1)  # the saved epoch's own number: it continues (nothing left of it)
    assert list(again) == []


def test_refused_state_dicts_change_nothing():
    s = DistributedGraBSampler(range(12), num_replicas=1, rank=0, seed=2)
    order = list(s)
    s.step(torch.from_numpy(np.stack([grad_of(i, 0) for i in order[:3]])))
    good = s.state_dict()
    target = DistributedGraBSampler(range(12), num_replicas=1, rank=0, seed=2)
    target.set_epoch(0)
    t_order = list(target)
    target.step(torch.from_numpy(np.stack([grad_of(i, 0) for i in t_order[:1]])))
    before = target.state_dict()

    def flipped(k):
        b = good["server"].clone()
        b[k] ^= 0x10
        return {**good, "server": b}

    bad = [
        ({**good, "format": "x"}, "not a DistributedGraBSampler"),
        ({**good, "version": 2}, "version"),
        ({**good, "n": 13}, "n=13"),
        ({**good, "seed": 5}, "seed=5"),
        ({**good, "mode": "efficient"}, "mode="),
        ({**good, "rank": 1}, "rank=1"),
        ({k: v for k, v in good.items() if k != "epoch"}, "malformed"),
        ({**good, "yielded": 99}, "outside the shard"),
        ({**good, "yielded": 1}, "behind"),
        ({**good, "server": good["server"][:-3]}, "corrupted CD-GraB checkpoint"),
        (flipped(40), "corrupted CD-GraB checkpoint"),
        ({**good, "server": good["server"].to(torch.int16)}, "uint8"),
        ({**good, "shards": good["shards"].flip(1)}, "shards differ"),
        ({**good, "shards": "not a tensor"}, "shards differ"),
        ({**good, "epoch": "one"}, "malformed"),
        ("not a dict", "not a DistributedGraBSampler"),
    ]
    for state, match in bad:
        with pytest.raises(torchgrab.StateDictError, match=match):
            target.load_state_dict(state)
        after = target.state_dict()
        assert bytes(after["server"].numpy()) == bytes(before["server"].numpy())
        assert {k: v for k, v in after.items() if k not in ("server", "shards")} == {
            k: v for k, v in before.items() if k not in ("server", "shards")
        }
    # Still usable where it was: the next step continues the target's own epoch.
    target.step(torch.from_numpy(np.stack([grad_of(i, 0) for i in t_order[1:3]])))
    assert target._native.cursor == 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _check_epochs(rank, world, n, steps, mode, epochs):
    sampler = DistributedGraBSampler(range(n), mode=mode, seed=7)
    assert (sampler.num_replicas, sampler.rank) == (world, rank)
    assert all(np.array_equal(x, sampler.shards) for x in _gather(sampler.shards))
    reference = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=7)
    full = Counter(i for r in range(world) for i in DistributedSampler(range(n), num_replicas=world, rank=r, seed=7))
    assert sum(steps) == len(sampler)
    expected = None
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        mine = list(sampler)
        if epoch == 0:
            assert mine == list(reference)
        everyone = _gather(mine)
        # Disjoint shards that together are DistributedSampler's padded index multiset.
        assert Counter(i for o in everyone for i in o) == full
        assert all(len(set(o)) == len(o) for o in everyone)
        if expected is not None:
            assert everyone == expected
        pos = 0
        for rows in steps:
            g = torch.from_numpy(np.stack([grad_of(i, epoch) for i in mine[pos : pos + rows]]))
            sampler.step({"w": g[:, :4].contiguous(), "b": g[:, 4:].contiguous()})  # two segments
            pos += rows
            reps = _gather(sampler.replica_bytes())
            assert all(r == reps[0] for r in reps), "replicas diverged"
        # pipelined is exact CD-GraB (Gram formulation, broadcast rounds): same simulation as exact.
        expected, s_want = simulate_epoch(everyone, steps, epoch, "efficient" if mode == "efficient" else "exact")
        np.testing.assert_allclose(sampler.running_sum, s_want, rtol=1e-10, atol=1e-10)
    return sampler


def _check_baselines(rank, world):
    """rr and so on real ranks: DistributedSampler's shards (rr reshuffled every epoch, so repeated),
    steps without collectives, and a collective mid-epoch resume that refuses states of different steps."""
    n = 22
    for ordering in ("rr", "so"):
        sampler = DistributedGraBSampler(range(n), ordering=ordering, seed=7)
        references = [DistributedSampler(range(n), num_replicas=world, rank=r, seed=7) for r in range(world)]
        seen = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            for reference in references:
                reference.set_epoch(epoch if ordering == "rr" else 0)
            mine = list(sampler)
            assert mine == list(references[rank])
            everyone = _gather(mine)
            # The padded data set, every epoch (rr pads with the front of that epoch's permutation).
            assert Counter(i for o in everyone for i in o) == Counter(i for r in references for i in r)
            assert set(i for o in everyone for i in o) == set(range(n))
            seen.append(everyone)
            if rank == 0:
                sampler.step(torch.zeros(len(mine), 1))  # a local count: rank 1 does not take part
        assert (seen[0] != seen[1] or seen[0] != seen[2]) if ordering == "rr" else seen[0] == seen[1] == seen[2]

        whole = DistributedGraBSampler(range(n), ordering=ordering, seed=7)
        whole.set_epoch(1)
        it = iter(whole)
        [next(it) for _ in range(5)]  # 3 consumed and stepped, 2 prefetched
        whole.step(torch.zeros(3, 1))
        saved = [whole.state_dict()]
        rest = list(it)
        whole.step(torch.zeros(2, 1))
        saved.append(whole.state_dict())
        fresh = DistributedGraBSampler(range(n), ordering=ordering, seed=7)
        fresh.load_state_dict(saved[0])  # a collective: every rank checks every rank's state
        fresh.set_epoch(1)
        assert list(fresh)[2:] == rest  # the two prefetched, unstepped indices come again first
        probe = DistributedGraBSampler(range(n), ordering=ordering, seed=7)
        before = probe.state_dict()
        with pytest.raises(torchgrab.StateDictError, match="different epochs or stepped rows"):
            probe.load_state_dict(saved[rank % 2])
        after = probe.state_dict()
        same = [k for k in before if k not in ("shards", "bytes_sent")]  # (the refusal's all_gather is counted)
        assert [after[k] for k in same] == [before[k] for k in same]


def _check_backward_parity(rank):
    """sampler.backward on a DDP model leaves the same .grad as DDP's own loss.backward()."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(D, 3))
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, D, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    loss_fn(model(x), y).backward()
    want = [p.grad.clone() for p in model.parameters()]
    for mode, method in [("exact", "vmap"), ("pipelined", "vmap"), ("efficient", "vmap"), ("exact", "hooks")]:
        s = DistributedGraBSampler(range(16), mode=mode)
        it = iter(s)
        [next(it) for _ in range(4)]
        model.zero_grad(set_to_none=True)
        loss = s.backward(model, loss_fn, x, y, method=method)
        assert torch.allclose(loss, loss_fn(model(x), y), atol=1e-6)
        for p, g in zip(model.parameters(), want):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
        assert s._native.cursor == 4 and len(set(_gather(s.replica_bytes()))) == 1
    for ordering in ("rr", "so"):  # an ordinary backward and the same all_reduce: the same .grad
        s = DistributedGraBSampler(range(16), ordering=ordering)
        it = iter(s)
        [next(it) for _ in range(4)]
        model.zero_grad(set_to_none=True)
        loss = s.backward(model, loss_fn, x, y)
        assert torch.allclose(loss, loss_fn(model(x), y), atol=1e-6)
        for p, g in zip(model.parameters(), want):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
        assert s.stepped == 4


def _check_checkpoint(rank, world):
    """Every rank saves mid-epoch; fresh samplers that load those states continue bit for bit like the
    uninterrupted run. Ranks loading states of different steps all refuse, and nothing changes."""
    n, steps = 22, [3, 3, 3, 2]
    for mode in ("exact", "pipelined", "efficient"):

        def play(sampler, epoch, rows_list, it=None):
            it = it if it is not None else iter(sampler)
            seen = []
            for rows in rows_list:
                batch = [next(it) for _ in range(rows)]
                sampler.step(torch.from_numpy(np.stack([grad_of(i, epoch) for i in batch])))
                seen.append((batch, sampler.replica_bytes()))
            return seen, it

        whole = DistributedGraBSampler(range(n), mode=mode, seed=7)
        play(whole, 0, steps)
        whole.set_epoch(1)
        head, it = play(whole, 1, steps[:2])
        saved = [whole.state_dict()]
        tail, _ = play(whole, 1, steps[2:], it)
        saved.append(whole.state_dict())  # two steps later, at the epoch's end
        whole.set_epoch(2)
        last, _ = play(whole, 2, steps)

        fresh = DistributedGraBSampler(range(n), mode=mode, seed=7)
        fresh.load_state_dict(saved[0])
        fresh.set_epoch(1)
        got_tail, _ = play(fresh, 1, steps[2:])
        fresh.set_epoch(2)
        got_last, _ = play(fresh, 2, steps)
        assert got_tail == tail and got_last == last, f"{mode}: resumed run diverged on rank {rank}"
        np.testing.assert_array_equal(fresh.running_sum, whole.running_sum)

        # Rank 1 loads the later checkpoint, rank 0 the earlier one: everyone refuses, nothing changes.
        probe = DistributedGraBSampler(range(n), mode=mode, seed=7)
        before = probe.replica_bytes()
        with pytest.raises(torchgrab.StateDictError, match="different replicated orders"):
            probe.load_state_dict(saved[rank % 2])
        assert probe.replica_bytes() == before
        # A corrupted state on rank 0: rank 0 raises its own error, the others learn that rank 0 refused.
        bad = dict(saved[0])
        if rank == 0:
            bad["server"] = bad["server"][:-1]
        with pytest.raises(torchgrab.StateDictError, match="corrupted" if rank == 0 else r"rank\(s\) \[0\] refused"):
            probe.load_state_dict(bad)
        assert probe.replica_bytes() == before


def _worker(rank, world, port, out_dir, scenario):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=20)
    )
    for mode in ("exact", "pipelined", "efficient"):
        # 2 ranks: B = 3, so pairs straddle steps; 4 ranks (shards of 6): a first step that closes no pair.
        steps = [3, 3, 3, 2] if world == 2 else [1, 2, 3]
        _check_epochs(rank, world, n=22, steps=steps, mode=mode, epochs=3)
    _check_baselines(rank, world)
    if scenario == "failures":
        _check_checkpoint(rank, world)
        with pytest.raises(torchgrab.UnsupportedInputError, match="do not match the process group"):
            DistributedGraBSampler(range(12), num_replicas=world + 1, rank=rank)
        _check_backward_parity(rank)
        s = DistributedGraBSampler(range(12), mode="efficient")
        it = iter(s)
        idx = [next(it) for _ in range(4)]
        before = s.replica_bytes()
        # A wrongly shaped batch on rank 1: every rank refuses the step, nobody hangs, nothing changes.
        g = torch.ones(3 if rank == 1 else 2, D, dtype=torch.float64)
        with pytest.raises(torchgrab.ShapeError, match="rank 1 stepped with rows=3"):
            s.step(g)
        # A local error on rank 0 (NaN): rank 0 raises it, the other ranks learn that rank 0 refused.
        g = torch.ones(2, D, dtype=torch.float64)
        if rank == 0:
            g[0, 0] = float("nan")
            with pytest.raises(torchgrab.NonFiniteGradientError):
                s.step(g)
        else:
            with pytest.raises(torchgrab.GraBError, match="rank 0 refused"):
                s.step(g)
        assert s.replica_bytes() == before
        s.step(torch.from_numpy(np.stack([grad_of(i, 0) for i in idx[:2]])))  # still in lockstep
        assert len(set(_gather(s.replica_bytes()))) == 1
        # A rank that dies: the survivors get a CollectiveError, not a hang.
        if rank == 1:
            os._exit(0)
        with pytest.raises(torchgrab.CollectiveError, match="peer rank died"):
            s.step(torch.from_numpy(np.stack([grad_of(i, 0) for i in idx[2:]])))
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
        os._exit(0)  # the process group is broken; skip its teardown
    open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    dist.destroy_process_group()


@pytest.mark.parametrize("world,scenario", [(2, "failures"), (4, "plain")])
def test_cd_grab_on_gloo(world, scenario):
    with tempfile.TemporaryDirectory() as out:
        # A forkserver that imported torch once forks the ranks: spawn would import torch once per rank.
        multiprocessing.set_forkserver_preload(["torch", "torchgrab.distributed", __name__])
        mp.start_processes(
            _worker, args=(world, _free_port(), out, scenario), nprocs=world, join=True, start_method="forkserver"
        )
        expect = {f"ok{r}" for r in range(world)} - ({"ok1"} if scenario == "failures" else set())
        assert expect <= set(os.listdir(out))


MNIST = os.environ.get("MNIST_DIR", "/work/shared/data/mnist")


@pytest.mark.skipif(not os.path.exists(os.path.join(MNIST, "t10k-labels-idx1-ubyte.gz")), reason="no MNIST copy")
def test_the_example_runs_as_one_rank(tmp_path, monkeypatch):
    """examples/distributed_mnist.py in quick mode (without torchrun it is a single rank)."""
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "distributed_mnist.py")
    spec = importlib.util.spec_from_file_location("distributed_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    argv = ["x", "--data", MNIST, "--train-size", "256", "--epochs", "2", "--out", str(tmp_path)]
    argv += ["--methods", "rr,cd-grab exact,cd-grab pipelined,cd-grab efficient"]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        module.main()
    finally:
        torch.set_num_threads(threads)
    rows = (tmp_path / "curves.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 2
    # With one rank, pipelined and efficient are exact CD-GraB: the same curve, number for number.
    curves = {}
    for row in rows[1:]:
        method, epoch, loss, acc = row.split(",")
        curves.setdefault(method, []).append((loss, acc))
    assert curves["cd-grab exact"] == curves["cd-grab pipelined"] == curves["cd-grab efficient"]


def test_yielded_indices_are_counted_across_chunks_and_a_stale_iterator_stops_mid_chunk():
    # Indices go out in chunks of 8,192 at C speed (torchgrab._cursor); step() checks its rows against
    # the count of those taken, and a newer __iter__ stops the old iterator inside its chunk.
    n = 20_000
    s = DistributedGraBSampler(range(n), num_replicas=1, rank=0, ordering="rr", seed=0)
    it = iter(s)
    first = list(itertools.islice(it, 8_192 + 5))
    assert len(set(first)) == 8_197
    s.step(np.zeros((8_197, 1), np.float32))
    with pytest.raises(torchgrab.ShapeError, match="only 0 yielded indices"):
        s.step(np.zeros((1, 1), np.float32))
    next(it)
    s.step(np.zeros((1, 1), np.float32))
    s.set_epoch(1)
    it2 = iter(s)
    with pytest.raises(StopIteration):
        next(it)
    assert sorted(it2) == list(range(n))
