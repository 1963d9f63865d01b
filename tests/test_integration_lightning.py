"""GraBCallback in real PyTorch Lightning fits on the CPU (nothing downloaded): a small MLP on synthetic data.

Each data set row carries its own index, so a test sees which examples every batch held. A spy on the
sampler records every ``step``: its rows and the indices they were matched to. With learning rate 0 the
weights stay at their start, so the rows can be compared with exact per-example gradients from
torch.func (``sketch=None``: the rows are those gradients). Two processes run under ddp_spawn's launcher
(gloo; started by a forkserver, see _ddp_fit) and write what they saw to files.
"""

import multiprocessing
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_same_state
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchgrab import GraBSampler, StateDictError, UnsupportedInputError
from torchgrab.gradients import per_example_gradients

pl = pytest.importorskip("lightning.pytorch")
from torchgrab.integrations.lightning import GraBCallback  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

N, D, CLASSES, B = 70, 8, 3, 16  # 70 = 4 x 16 + 6: the last batch is smaller


def test_an_untested_lightning_is_warned_about(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the installed release is tested: no warning
        GraBCallback()
    monkeypatch.setattr(pl, "__version__", "2.4.0")
    with pytest.warns(RuntimeWarning, match=r"tested with Lightning 2\.5 or newer \(this process has 2\.4\.0\)"):
        GraBCallback()


def dataset(n=N):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, D, generator=g), torch.randint(0, CLASSES, (n,), generator=g), torch.arange(n))


def loss_fn(out, y):
    return nn.functional.cross_entropy(out, y)


class Net(pl.LightningModule):
    """An MLP whose training_step calls self.net(x), as Lightning's examples do (or self(x): call_self)."""

    def __init__(self, lr=0.0, call_self=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, CLASSES))
        self.lr = lr
        self.call_self = call_self
        self.seen = []  # (epoch, batch_idx, indices)

    def setup(self, stage):
        # Started by a forkserver (see _ddp_fit), the ranks receive the parameters in shared memory, one
        # storage for all of them, and each optimizer step would update it twice (Lightning 2.6 un-shares
        # them only for start_method="spawn"): every rank takes its own copy, as under spawn.
        for p in self.parameters():
            if p.is_shared():
                p.data = p.data.clone()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.append((self.current_epoch, batch_idx, idx.tolist()))
        return loss_fn(self(x) if self.call_self else self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Recorder(pl.Callback):
    """Spies on the GraBCallback's sampler: every step's rows and matched indices, every epoch's order.
    With ``out``, each rank writes what it saw (and the final weights and sampler state) to a file."""

    def __init__(self, grab, out=None):
        self.grab = grab
        self.out = out
        self.steps = []  # (epoch order number, indices, rows)
        self.orders = []

    def on_train_start(self, trainer, pl_module):
        sampler = self.grab.sampler
        step = sampler.step

        def spy(grads, *args, **kwargs):
            rows = np.array(grads, dtype=np.float32, copy=True)
            idx = sampler._order[sampler._stepped : sampler._stepped + len(rows)].tolist()
            self.steps.append((sampler._native.epochs_begun, idx, rows))
            return step(grads, *args, **kwargs)

        sampler.step = spy

    def on_train_epoch_end(self, trainer, pl_module):
        self.orders.append(self.grab.sampler._order.tolist())

    def on_train_end(self, trainer, pl_module):
        if self.out is None:
            return
        self.grab.handle.flush()
        self.grab.sampler.synchronize()
        torch.save(
            {
                "seen": pl_module.seen,
                "orders": self.orders,
                "steps": [(e, i, torch.from_numpy(r)) for e, i, r in self.steps],
                "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "sampler": self.grab.sampler.state_dict(),
            },
            os.path.join(self.out, f"rank{trainer.global_rank}.pt"),
        )


def trainer(callbacks, epochs=3, **kwargs):
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def fit(model, callbacks, loader=None, ckpt_path=None, epochs=3, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(callbacks, epochs=epochs, **kwargs)
        if loader is None:
            loader = DataLoader(dataset(), batch_size=B, shuffle=True)
        # loader=False: the module's own train_dataloader()
        t.fit(model, None if loader is False else loader, ckpt_path=ckpt_path)
    return t


def exact_rows(handle, model, indices):
    """[len(indices), K]: the handle's projection of exact per-example gradients at the model's weights."""
    x, y, _ = dataset()[:]
    grads, _ = per_example_gradients(model, loss_fn, x[indices], y[indices])
    flat = torch.cat([g.reshape(len(indices), -1) for g in grads.values()], dim=1)
    return handle.project(grads), flat


def assert_rows(actual, expected):
    actual = torch.as_tensor(np.asarray(actual), dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


def per_epoch(steps):
    """{epoch order number: (indices, rows)} from a recorder's steps."""
    out = {}
    for e, idx, rows in steps:
        have = out.setdefault(e, ([], []))
        have[0].extend(idx)
        have[1].append(np.asarray(rows))
    return {e: (idx, np.concatenate(rows)) for e, (idx, rows) in out.items()}


# ---------------------------------------------------------------------------------------------- one device
@pytest.mark.parametrize("accumulate,call_self", [(1, True), (2, False)])
def test_one_device_rows_are_each_examples_gradient_and_orders_are_graBs(accumulate, call_self):
    grab = GraBCallback(watch={"sketch": None}, seed=3)
    rec = Recorder(grab)
    model = Net(lr=0.0, call_self=call_self)
    t = fit(model, [grab, rec], accumulate_grad_batches=accumulate)

    loader = t.train_dataloader
    assert loader.sampler is grab.sampler and loader.batch_size == B and not loader.drop_last
    epochs = per_epoch(rec.steps)
    assert sorted(epochs) == [1, 2, 3]
    for k, (idx, rows) in sorted(epochs.items()):
        # One row per example per epoch, matched to the indices the model trained on, in that order.
        seen = [i for e, _, batch in model.seen if e == k - 1 for i in batch]
        assert idx == seen == rec.orders[k - 1]
        assert sorted(idx) == list(range(N))
        # lr = 0: each row is the example's exact gradient, also in the epoch's last (smaller, and with
        # accumulate=2 shorter) accumulation, which Lightning divides by accumulate_grad_batches too.
        expected, flat = exact_rows(grab.handle, model, idx)
        assert_rows(rows, expected)
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), flat.norm(dim=1).numpy(), rtol=1e-4)

    # The orders are those of a fresh sampler fed the same rows outside Lightning.
    fresh = GraBSampler(n=N, seed=3)
    for k, (_, rows) in sorted(epochs.items()):
        assert list(fresh) == rec.orders[k - 1]
        fresh.step(rows)
    assert grab.sampler._native.epoch == 2  # numbered as the Trainer's epochs (set_epoch 0, 1, 2)


class SequenceNet(Net):
    """Net over each example's D features read as a sequence of one position, with a LayerNorm: with
    sketch=4 the first layer's input is projected in its forward hook (a 3-d input, its factors wider
    than 4)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, D)), nn.Linear(D, 6), nn.LayerNorm(6), nn.Tanh(), nn.Flatten(), nn.Linear(6, CLASSES)
        )


def test_bf16_mixed_precision_rows_are_float32_sketches():
    # precision="bf16-mixed" runs training_step under torch.autocast, the forward hooks with it: the
    # projections made there came out in bfloat16, and the backward's float32 product refused it.
    grab = GraBCallback(watch={"sketch": 4}, seed=3)
    rec = Recorder(grab)
    model = SequenceNet(lr=0.0)
    fit(model, [grab, rec], epochs=1, precision="bf16-mixed")
    ((idx, rows),) = per_epoch(rec.steps).values()
    assert sorted(idx) == list(range(N)) and rows.dtype == np.float32
    expected, _ = exact_rows(grab.handle, model, idx)  # float32 gradients at the same (unchanged) weights
    expected = expected.numpy()
    cos = (rows * expected).sum(1) / np.linalg.norm(rows, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 0.99, cos
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), np.linalg.norm(expected, axis=1), rtol=0.05)


def _tagging_collate(items):
    x, y, idx = (torch.stack(t) for t in zip(*items))
    return x, y, idx


class OwnLoader(Net):
    """A module with its own train_dataloader(): 2 workers, drop_last, a collate_fn of its own."""

    def train_dataloader(self):
        return DataLoader(
            dataset(), batch_size=B, shuffle=True, num_workers=2, drop_last=True, collate_fn=_tagging_collate
        )


def test_the_modules_own_loader_keeps_its_settings_and_workers_change_no_matching():
    grab = GraBCallback(seed=3)
    rec = Recorder(grab)
    model = OwnLoader(lr=0.1)
    t = fit(model, [grab, rec], loader=False, epochs=2)
    loader = t.train_dataloader
    assert isinstance(loader.sampler, GraBSampler) and loader.sampler is grab.sampler
    assert (loader.batch_size, loader.num_workers, loader.drop_last) == (B, 2, True)
    assert loader.collate_fn is _tagging_collate
    for k, (idx, _) in sorted(per_epoch(rec.steps).items()):
        # Workers read ahead; the rows still go to the indices of the batches the model trained on.
        seen = [i for e, _, batch in model.seen if e == k - 1 for i in batch]
        assert idx == seen and len(seen) == 4 * B  # drop_last: the 6 left over get no row this epoch
        assert rec.orders[k - 1][: 4 * B] == seen
    assert sorted(rec.orders[1]) == list(range(N))


class OutOfMemoryAbove8(Net):
    """A module whose forward "runs out of memory" on a batch of more than 8, after its first layer, and
    whose train_dataloader takes ``batch_size`` from it (what BatchSizeFinder scales)."""

    def __init__(self):
        super().__init__(call_self=True)
        self.batch_size = 4

    def train_dataloader(self):
        return DataLoader(dataset(), batch_size=self.batch_size, shuffle=True)

    def forward(self, x):
        h = self.net[0](x)
        if len(x) > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net[2](self.net[1](h))


def test_batch_size_finder_runs_out_of_memory_and_the_fit_after_it_has_exact_rows(tmp_path):
    # BatchSizeFinder tries batches of 4, 8 and 16 (which runs out of memory in its forward, caught by
    # Lightning) and restores the states of before its trials, the sampler's too. The dropped step of
    # the failed batch leaves every later row its own example's. Before, the next trial's first forward
    # joined the failed one's step and was refused ("got an input of shape (8, 8) in a step whose batch
    # has 16 examples").
    grab = GraBCallback(watch={"sketch": None}, seed=3)
    rec = Recorder(grab)
    model = OutOfMemoryAbove8()
    finder = pl.callbacks.BatchSizeFinder(mode="power", init_val=4, max_trials=4, steps_per_trial=2)
    fit(model, [finder, grab, rec], loader=False, epochs=2, default_root_dir=str(tmp_path))
    assert model.batch_size == 8
    epochs = per_epoch(rec.steps)
    assert len(epochs) == 2  # the fit's two epochs (the trials stepped no full epoch)
    for idx, rows in epochs.values():
        assert sorted(idx) == list(range(N))
        assert_rows(rows, exact_rows(grab.handle, model, idx)[0])


class SkipsABatch(Net):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx == 1 else loss  # Lightning then skips this batch's backward


def test_a_batch_without_backward_leaves_its_examples_unseen():
    grab = GraBCallback(watch={"sketch": None}, seed=3)
    rec = Recorder(grab)
    model = SkipsABatch()
    fit(model, [grab, rec], epochs=2)
    handle = grab.handle
    for k, (idx, rows) in sorted(per_epoch(rec.steps).items()):
        batches = [batch for e, _, batch in model.seen if e == k - 1]
        assert idx == [i for j, batch in enumerate(batches) if j != 1 for i in batch]
        assert_rows(rows, exact_rows(handle, model, idx)[0])


def test_ddp_on_one_process_keeps_the_order(monkeypatch):
    # A DDP strategy wraps any sampler that is not a DistributedSampler in one that shuffles, also on one
    # process; the callback hands Lightning the GraB order as a one-replica DistributedSampler.
    grab = GraBCallback(seed=3)
    rec = Recorder(grab)
    model = Net(lr=0.1)
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)  # Lightning sets them here; the next test picks its own
    try:
        t = fit(model, [grab, rec], epochs=2, strategy="ddp")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert t.world_size == 1 and type(t.train_dataloader.sampler).__name__ == "_WholeOrder"
    for k, order in enumerate(rec.orders):
        assert [i for e, _, batch in model.seen if e == k for i in batch] == order


def test_a_gradscaler_is_passed_and_its_scale_undone():
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    grab = GraBCallback(watch={"sketch": None}, seed=3)
    rec = Recorder(grab)
    model = Net()
    fit(model, [grab, rec], epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert grab.handle.scaler is scaler
    ((idx, rows),) = per_epoch(rec.steps).values()
    expected = exact_rows(grab.handle, model, idx)[0]
    torch.testing.assert_close(torch.from_numpy(rows), expected, rtol=0.05, atol=0.02 * float(expected.abs().max()))


@pytest.mark.parametrize(
    "loader,match",
    [
        ({"a": DataLoader(dataset(), batch_size=B), "b": DataLoader(dataset(), batch_size=B)}, "one torch DataLoader"),
        (DataLoader(dataset(), batch_sampler=[[0, 1], [2, 3]]), "batch_size="),
    ],
)
def test_refused_loaders(loader, match):
    with pytest.raises(UnsupportedInputError, match=match):
        fit(Net(), [GraBCallback()], loader=loader, epochs=1)


def test_refused_arguments_and_states():
    with pytest.raises(UnsupportedInputError, match="data set from the training DataLoader"):
        GraBCallback(n=10)
    with pytest.raises(UnsupportedInputError, match="ordring"):
        GraBCallback(ordring="pair")
    with pytest.raises(UnsupportedInputError, match="skecth"):
        GraBCallback(watch={"skecth": 4})
    # A mid-epoch state of 2 processes cannot continue on 1: Lightning would count the batches left
    # in batches of the old shards.
    sampler = GraBSampler(n=N)
    it = iter(sampler)
    rows = np.ones((2 * BD, 3), np.float32)
    for _ in range(len(rows)):
        next(it)
    sampler.step(rows)
    with pytest.raises(StateDictError, match="mid-epoch by 2 process"):
        GraBCallback().load_state_dict({"sampler": sampler.state_dict(), "world_size": 2})


def test_a_failed_fit_leaves_no_hooks():
    class Fails(Net):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    grab = GraBCallback()
    model = Fails()
    with pytest.raises(RuntimeError, match="boom"):
        fit(model, [grab], epochs=1)
    assert grab.handle.removed
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------- resume
def _checkpoints(tmp_path, mid, last):
    """A checkpoint mid-epoch (optimizer step `mid`), one at the end of an epoch's last batch (step `last`,
    saved in on_train_batch_end) and one at every epoch's end (on_train_epoch_end)."""
    return [
        pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "mid", every_n_train_steps=mid, save_top_k=-1),
        pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "last", every_n_train_steps=last, save_top_k=-1),
        pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "epochs", every_n_epochs=1, save_top_k=-1),
    ]


@pytest.mark.parametrize(
    "loader_kind,workers,accumulate",
    [("DataLoader", 0, 1), ("DataLoader", 0, 2), ("StatefulDataLoader", 0, 1), ("StatefulDataLoader", 1, 1)],
)
def test_resume_mid_epoch_and_at_epoch_end_is_exact(tmp_path, loader_kind, workers, accumulate):
    if loader_kind == "DataLoader":
        make = DataLoader
    else:
        make = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader

    def loader():
        return make(dataset(), batch_size=B, shuffle=True, num_workers=workers)

    # 5 batches an epoch: optimizer steps 5 an epoch (accumulate 1) or 3 (2 + 2 + 1).
    mid, last = (7, 10) if accumulate == 1 else (4, 6)
    grab = GraBCallback(seed=5)
    model = Net(lr=0.5)
    fit(model, [grab, *_checkpoints(tmp_path, mid, last)], loader=loader(), accumulate_grad_batches=accumulate)
    # Checkpointing changes nothing: a run without it ends with the same weights.
    plain = Net(lr=0.5)
    fit(plain, [GraBCallback(seed=5)], loader=loader(), accumulate_grad_batches=accumulate)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)

    final = grab.sampler.state_dict()
    resumes = [(tmp_path / "epochs" / f"epoch=0-step={5 // accumulate + 5 % accumulate}.ckpt", 5)]
    resumes += [(tmp_path / "mid" / f"epoch=1-step={mid}.ckpt", 7)]
    if loader_kind == "DataLoader":
        # (Lightning 2.6 resumes a StatefulDataLoader saved after an epoch's last batch at the end of that
        # epoch, then trains no batch in the next one, with any sampler: not a case to compare with.)
        resumes += [(tmp_path / "last" / f"epoch=1-step={last}.ckpt", 10)]
    for ckpt, done in resumes:
        resumed, rgrab = Net(lr=0.5, seed=1), GraBCallback(seed=5)  # other initial weights: the checkpoint has them
        fit(resumed, [rgrab], loader=loader(), ckpt_path=str(ckpt), accumulate_grad_batches=accumulate)
        # Exactly the batches the uninterrupted run trained on after the checkpoint, in that order.
        assert resumed.seen == model.seen[done:], ckpt.name
        for a, b in zip(model.parameters(), resumed.parameters()):
            assert torch.equal(a, b), ckpt.name
        assert_same_state(rgrab.sampler.state_dict(), final)


class FailsAt(Net):
    """Raises at its ``at``-th batch: in training_step (before the forward), in the optimizer step (after
    the backward) or in on_train_batch_end (after the optimizer step)."""

    def __init__(self, at, where, **kwargs):
        super().__init__(**kwargs)
        self.at, self.where, self.batches = at, where, 0

    def training_step(self, batch, batch_idx):
        self.batches += 1
        if self.where == "training_step" and self.batches == self.at:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer):
        if self.where == "optimizer step" and self.batches == self.at:
            raise RuntimeError("boom")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.where == "batch end" and self.batches == self.at:
            raise RuntimeError("boom")


@pytest.mark.parametrize(
    "where,at,workers",
    [
        ("training_step", 8, 0),  # mid-epoch, the rows of the epoch's first two batches not fed yet
        ("training_step", 11, 1),  # an epoch's first batch, its indices prefetched by a worker
        ("optimizer step", 8, 0),  # the backward completed: its rows exist, and Lightning redoes the batch
        ("batch end", 8, 1),  # the optimizer stepped: Lightning counts the batch done
    ],
)
def test_an_on_exception_checkpoint_resumes_exactly(tmp_path, where, at, workers):
    """OnExceptionCheckpoint saves when fit raises: the resumed fit trains exactly what the uninterrupted
    one trained after the batches Lightning counts as done, and ends with the same weights and sampler."""

    def loader():
        return DataLoader(dataset(), batch_size=B, shuffle=True, num_workers=workers)

    model, grab = Net(lr=0.5), GraBCallback(seed=5)
    fit(model, [grab], loader=loader())
    failing = FailsAt(at, where, lr=0.5)
    saves = [
        pl.callbacks.OnExceptionCheckpoint(dirpath=tmp_path),
        pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "none", save_top_k=0),
    ]
    with pytest.raises(RuntimeError, match="boom"):
        fit(failing, [GraBCallback(seed=5), *saves], loader=loader())
    done = len(failing.seen) - (where == "optimizer step")  # a batch whose optimizer step raised is redone
    resumed, rgrab = Net(lr=0.5, seed=1), GraBCallback(seed=5)
    fit(resumed, [rgrab], loader=loader(), ckpt_path=str(tmp_path / "on_exception.ckpt"))
    assert resumed.seen == model.seen[done:]
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert_same_state(rgrab.sampler.state_dict(), grab.sampler.state_dict())


def test_rr_with_workers_resumed_at_an_epochs_end_draws_the_next_epochs_order(tmp_path):
    """With workers, Lightning makes the resumed (and the first) epoch's iterator, which begins the epoch,
    before it calls set_epoch for it; the late call must not renumber the epoch after it."""

    def loader():
        return DataLoader(dataset(), batch_size=B, shuffle=True, num_workers=1)

    model, grab = Net(lr=0.5), GraBCallback(seed=5, ordering="rr")
    fit(model, [grab, pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)], loader=loader())
    resumed, rgrab = Net(lr=0.5, seed=1), GraBCallback(seed=5, ordering="rr")
    fit(resumed, [rgrab], loader=loader(), ckpt_path=str(tmp_path / "epoch=0-step=5.ckpt"))
    assert resumed.seen == model.seen[5:]
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert_same_state(rgrab.sampler.state_dict(), grab.sampler.state_dict())


# ---------------------------------------------------------------------------------------------- two processes
W, BD = 2, 8  # rounds of 2 x 8 = 16 indices: 70 = 4 x 16 + 6, so the last round is padded


def _ddp_fit(out, lr, epochs, ckpt_path=None, callbacks=(), watch=None):
    """A 2-process fit on gloo; returns what each rank wrote. ddp_spawn's launcher (the trainer and its
    callbacks are pickled to fresh processes) with start_method="forkserver": a server that imported
    torch and Lightning once forks the ranks, where spawn would import them in every rank of every fit
    (20-30 s per fit on two loaded cores). Net.setup gives each rank its own parameters, as spawn does."""
    os.makedirs(out, exist_ok=True)
    os.environ.pop("MASTER_PORT", None)  # a free port for each fit
    multiprocessing.set_forkserver_preload(["torch", "lightning.pytorch", __name__])
    strategy = pl.strategies.DDPStrategy(start_method="forkserver")
    grab = GraBCallback(watch=watch, seed=5)
    loader = DataLoader(dataset(), batch_size=BD, shuffle=True)
    fit(
        Net(lr=lr),
        [grab, Recorder(grab, out=str(out)), *callbacks],
        loader,
        ckpt_path,
        epochs,
        devices=W,
        strategy=strategy,
    )
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(W)]


def _rank_batches(order, rank):
    """Rank `rank`'s batches of the shared order: batches rank, rank + W, ..., the last round padded
    with the epoch's first indices."""
    rounds = -(-len(order) // (W * BD))
    padded = order + order[: rounds * W * BD - len(order)]
    return [padded[(j * W + rank) * BD : (j * W + rank + 1) * BD] for j in range(rounds)]


def test_two_processes_share_one_order_balanced_with_both_ranks_rows(tmp_path):
    ranks = _ddp_fit(tmp_path / "lr0", lr=0.0, epochs=2, watch={"sketch": None})
    orders = ranks[0]["orders"]
    assert ranks[1]["orders"] == orders and len(orders) == 2  # identical permutations on both ranks
    assert_same_state(ranks[0]["sampler"], ranks[1]["sampler"])
    for e, order in enumerate(orders):
        assert sorted(order) == list(range(N))
        for r, rank in enumerate(ranks):
            assert [b for ep, _, b in rank["seen"] if ep == e] == _rank_batches(order, r)
        assert set().union(*(b for rank in ranks for ep, _, b in rank["seen"] if ep == e)) == set(range(N))

    # Every replica was fed both ranks' rows, each example once (padding repeats dropped), in the
    # order of the shared permutation, and each row is the example's exact gradient (lr = 0).
    model = Net()
    handle = GraBSampler(n=N).watch(model, sketch=None)
    for rank in ranks:
        epochs = per_epoch([(e, i, r.numpy()) for e, i, r in rank["steps"]])
        for k, (idx, rows) in sorted(epochs.items()):
            assert idx == orders[k - 1]
            assert_rows(rows, exact_rows(handle, model, idx)[0])
    # The next order is the one a single process builds from the exact per-example gradients.
    fresh = GraBSampler(n=N, seed=5)
    assert list(fresh) == orders[0]
    fresh.step(exact_rows(handle, model, orders[0])[0])
    assert list(fresh) == orders[1]


def test_two_processes_resume_mid_epoch_exactly(tmp_path):
    steps = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_top_k=-1)
    full = _ddp_fit(tmp_path / "full", lr=0.5, epochs=3, callbacks=[steps])
    resumed = _ddp_fit(tmp_path / "resumed", lr=0.5, epochs=3, ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=7.ckpt"))
    for r in range(W):
        assert resumed[r]["seen"] == full[r]["seen"][7:]
        assert_same_state(resumed[r]["sampler"], full[r]["sampler"])
        for k, v in full[r]["weights"].items():
            assert torch.equal(resumed[r]["weights"][k], v), k
