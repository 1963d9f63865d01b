"""torchdata's StatefulDataLoader around a GraBSampler.

How it resumes (torchdata 0.11): with ``sampler=`` and ``batch_size=``, the loader wraps the sampler in
its own BatchSampler, whose iterator saves ``sampler.state_dict()`` and, because our epoch iterator is
stateful too, ``iterator.state_dict()`` (how many indices its consumer took). On resume it calls
``iter(sampler)`` (lazy: no epoch is begun), ``sampler.load_state_dict``, ``iter(sampler)`` again and
``iterator.load_state_dict``, then asks for the batch after the last one delivered before the
checkpoint. With ``num_workers=0`` the snapshot is taken when ``loader.state_dict()`` is called; with
workers it is taken when each batch's indices are dispatched (``snapshot_every_n_steps=1``), so it
predates the steps of the batches in flight. Saving ``sampler.state_dict()`` next to the loader's
state and loading it with ``newer_than_loader=True`` makes worker resumes bit-exact too.
"""

import pytest
import torch
import torchgrab
from conftest import save_load
from torch.utils.data import TensorDataset
from torchgrab import GraBSampler

sdl = pytest.importorskip("torchdata.stateful_dataloader")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N, B = 23, 4


def dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 3, generator=g), torch.arange(N))


def loader(ds, sampler, workers, drop_last=False):
    kw = dict(num_workers=workers, prefetch_factor=2) if workers else {}
    return sdl.StatefulDataLoader(ds, batch_size=B, sampler=sampler, drop_last=drop_last, **kw)


def train(ds, ordering, workers, epochs, checkpoint_at=None, drop_last=False):
    """Epochs of (deliver, step); returns the delivered indices per epoch and, if asked, the loader's
    state (through torch.save) right after the step of global batch `checkpoint_at`."""
    sampler = GraBSampler(ds, ordering=ordering, seed=2)
    dl = loader(ds, sampler, workers, drop_last)
    seen, k = [], 0
    for _ in range(epochs):
        seen.append([])
        for x, idx in dl:
            sampler.step(x)
            seen[-1].extend(idx.tolist())
            if k == checkpoint_at:
                return seen, save_load(dl.state_dict())
            k += 1
    return seen, None


def resume(ds, ordering, workers, state, epochs, drop_last=False):
    sampler = GraBSampler(ds, ordering=ordering, seed=2)
    dl = loader(ds, sampler, workers, drop_last)
    dl.load_state_dict(state)
    seen = []
    for _ in range(epochs):
        seen.append([])
        for x, idx in dl:
            # FIFO matching survives the resume: each batch is the sampler's next pending indices.
            assert idx.tolist() == sampler._order[sampler._stepped : sampler._stepped + len(idx)].tolist()
            sampler.step(x)
            seen[-1].extend(idx.tolist())
    return seen


def batches_per_epoch(drop_last):
    return N // B if drop_last else -(-N // B)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("ordering", ["grab", "pair", "rr"])
def test_single_process_resume_is_exact_at_every_batch(ordering, drop_last):
    ds = dataset()
    epochs = 3
    ref, _ = train(ds, ordering, 0, epochs, drop_last=drop_last)
    per = batches_per_epoch(drop_last)
    for k in range(epochs * per - 1):
        head, state = train(ds, ordering, 0, epochs, checkpoint_at=k, drop_last=drop_last)
        done_epochs = k // per
        tail = resume(ds, ordering, 0, state, epochs - done_epochs, drop_last=drop_last)
        # The loader continues right after the checkpointed batch: same indices, same later orders.
        joined = head[:-1] + [head[-1] + tail[0]] + tail[1:]
        assert joined == ref, f"checkpoint after batch {k}"


@pytest.mark.parametrize("ordering", ["grab", "pair"])
def test_worker_resume_loses_and_duplicates_nothing(ordering):
    ds = dataset()
    for k in [0, 2, 4, 5, 7]:
        head, state = train(ds, ordering, 2, 2, checkpoint_at=k)
        done_epochs = k // batches_per_epoch(False)
        tail = resume(ds, ordering, 2, state, 2 - done_epochs)
        epoch = head[-1] + tail[0]
        assert sorted(epoch) == list(range(N)), f"checkpoint after batch {k}: {epoch}"
        for later in tail[1:]:
            assert sorted(later) == list(range(N))


def test_workers_snapshot_the_sampler_at_dispatch():
    """Documents why the loader's state alone cannot give a bit-exact worker resume: the sampler state
    inside its snapshot of batch k was taken when batch k was dispatched, before the in-flight batches
    were stepped (hence newer_than_loader=True with the sampler's own state, tested below)."""
    ds = dataset()
    _, state = train(ds, "grab", 2, 1, checkpoint_at=2)
    main = state["_snapshot"]["_main_snapshot"]["_sampler_iter_state"]
    assert main["sampler_iter_state"]["yielded"] == 3 * B  # the consumer holds batches 0..2
    assert main["sampler_state"]["stepped"] < 3 * B  # but batch 2 had not been stepped at dispatch


def train_saving_both(ds, ordering, workers, epochs, checkpoint_at=None, persistent=False, every=1, drop_last=False):
    """Like `train`, but the checkpoint holds the loader's state and the sampler's own state, both
    taken right after the step of global batch `checkpoint_at`."""
    sampler = GraBSampler(ds, ordering=ordering, seed=2)
    kw = dict(num_workers=workers, prefetch_factor=2, persistent_workers=persistent) if workers else {}
    dl = sdl.StatefulDataLoader(
        ds, batch_size=B, sampler=sampler, snapshot_every_n_steps=every, drop_last=drop_last, **kw
    )
    seen, k = [], 0
    for _ in range(epochs):
        seen.append([])
        for x, idx in dl:
            sampler.step(x)
            seen[-1].extend(idx.tolist())
            if k == checkpoint_at:
                return seen, save_load({"loader": dl.state_dict(), "sampler": sampler.state_dict()}), sampler
            k += 1
    return seen, None, sampler


def resume_both(ds, ordering, workers, ckpt, epochs, persistent=False, every=1, drop_last=False):
    sampler = GraBSampler(ds, ordering=ordering, seed=2)
    kw = dict(num_workers=workers, prefetch_factor=2, persistent_workers=persistent) if workers else {}
    dl = sdl.StatefulDataLoader(
        ds, batch_size=B, sampler=sampler, snapshot_every_n_steps=every, drop_last=drop_last, **kw
    )
    dl.load_state_dict(ckpt["loader"])
    sampler.load_state_dict(ckpt["sampler"], newer_than_loader=True)
    seen = []
    for _ in range(epochs):
        seen.append([])
        for x, idx in dl:
            sampler.step(x)
            seen[-1].extend(idx.tolist())
    return seen, sampler


# (ordering, persistent_workers, snapshot_every_n_steps, drop_last); persistent workers keep it fast.
WORKER_CASES = [
    ("grab", False, 1, False),
    ("pair", True, 1, False),
    ("grab", True, 3, False),
    ("pair", True, 2, False),
    ("grab", True, 1, True),
]


@pytest.mark.parametrize("ordering,persistent,every,drop_last", WORKER_CASES)
def test_worker_resume_is_exact_with_the_sampler_state_saved_too(ordering, persistent, every, drop_last):
    """num_workers=2, prefetch_factor=2: the loader's own snapshot predates the steps of the batches in
    flight; the sampler's state saved at the checkpoint has them, and newer_than_loader=True keeps it
    over the loader's older copy. The resumed run then delivers the same indices and builds the same
    orders, bit for bit, as the uninterrupted one, over three epochs. With snapshot_every_n_steps > 1
    the loader replays (and discards) the batches since its last snapshot; the sampler hands their
    indices out again without counting them as pending."""
    ds = dataset()
    epochs, per = 3, batches_per_epoch(drop_last)
    opts = dict(persistent=persistent, every=every, drop_last=drop_last)
    ref, _, ref_sampler = train_saving_both(ds, ordering, 2, epochs, **opts)
    for k in [0, 1, 3, per - 1, per, per + 1, per + 2, 2 * per - 1, 2 * per + 4]:
        head, ckpt, _ = train_saving_both(ds, ordering, 2, epochs, checkpoint_at=k, **opts)
        assert ckpt is not None
        tail, sampler = resume_both(ds, ordering, 2, ckpt, epochs - k // per, **opts)
        joined = head[:-1] + [head[-1] + tail[0]] + tail[1:]
        assert joined == ref, f"checkpoint after batch {k}"
        a, b = sampler.state_dict()["native"], ref_sampler.state_dict()["native"]
        assert torch.equal(a["current"], b["current"]), f"checkpoint after batch {k}"
        assert torch.equal(a["balance"]["s"], b["balance"]["s"]), f"checkpoint after batch {k}"


def test_single_process_resume_with_both_states_is_exact():
    ds = dataset()
    ref, _, _ = train_saving_both(ds, "grab", 0, 2)
    per = batches_per_epoch(False)
    for k in [0, 2, per - 1, per + 1]:
        head, ckpt, _ = train_saving_both(ds, "grab", 0, 2, checkpoint_at=k)
        tail, _ = resume_both(ds, "grab", 0, ckpt, 2 - k // per)
        assert head[:-1] + [head[-1] + tail[0]] + tail[1:] == ref, f"checkpoint after batch {k}"


def test_newer_than_loader_refuses_a_snapshot_that_is_not_earlier():
    """The loader's snapshot must be an earlier point of the held state's epoch (or the time before it
    began); a later one is refused clearly and leaves the held state in place."""
    ds = dataset()
    _, early, _ = train_saving_both(ds, "grab", 0, 2, checkpoint_at=1)  # epoch 0
    _, late, _ = train_saving_both(ds, "grab", 0, 2, checkpoint_at=batches_per_epoch(False) + 1)  # epoch 1
    s = GraBSampler(ds, ordering="grab", seed=2)
    s.load_state_dict(early["sampler"], newer_than_loader=True)
    held = s.state_dict()
    with pytest.raises(torchgrab.StateDictError, match="not an earlier point"):
        s.load_state_dict(late["sampler"])
    assert s.state_dict()["native"]["epochs_begun"] == held["native"]["epochs_begun"]
    assert s.state_dict()["stepped"] == held["stepped"]
    # Without the flag, a later load simply replaces the state.
    s.load_state_dict(late["sampler"])
    assert s.state_dict()["stepped"] == late["sampler"]["stepped"]


def _watched_run(ds, epochs, checkpoint_at=None, ckpt=None):
    """A model trained by an ordinary loop whose sampler is fed by watch(), through a StatefulDataLoader
    with 2 workers; checkpoint = model, optimizer, loader and sampler states after batch checkpoint_at."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = GraBSampler(ds, ordering="grab", seed=2)
    sampler.watch(model)
    dl = sdl.StatefulDataLoader(ds, batch_size=B, sampler=sampler, num_workers=2, prefetch_factor=2)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        dl.load_state_dict(ckpt["loader"])
        sampler.load_state_dict(ckpt["sampler"], newer_than_loader=True)
    seen, k = [], 0
    for _ in range(epochs):
        seen.append([])
        for x, idx in dl:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), idx % 2).backward()
            opt.step()
            seen[-1].extend(idx.tolist())
            if k == checkpoint_at:
                state = {"model": model.state_dict(), "opt": opt.state_dict()}
                state.update(loader=dl.state_dict(), sampler=sampler.state_dict())
                return seen, save_load(state), model
            k += 1
    return seen, None, model


def test_worker_resume_is_exact_when_watch_feeds_the_sampler():
    # watch() feeds a step's rows at the next forward: the sampler state saved at the checkpoint
    # includes the last step's rows (state_dict feeds them first), so the resume is bit-exact too.
    ds = dataset()
    ref, _, ref_model = _watched_run(ds, 3)
    per = batches_per_epoch(False)
    for k in [2, per - 1, per + 3]:
        head, ckpt, _ = _watched_run(ds, 3, checkpoint_at=k)
        tail, _, model = _watched_run(ds, 3 - k // per, ckpt=ckpt)
        assert head[:-1] + [head[-1] + tail[0]] + tail[1:] == ref, f"checkpoint after batch {k}"
        assert torch.equal(model.weight, ref_model.weight) and torch.equal(model.bias, ref_model.bias)
