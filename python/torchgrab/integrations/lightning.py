"""GraB inside PyTorch Lightning: ``Trainer(callbacks=[GraBCallback()])`` and nothing else changes.

What it does behind the Trainer's back, and why:

- gives the training ``DataLoader`` a :class:`~torchgrab.GraBSampler` over its data set (same batch size,
  collate_fn, workers, ...; re-instantiated with Lightning's own ``_update_dataloader``) at the moment
  the fit loop requests the loader, before Lightning processes or iterates it. With several processes,
  Lightning would wrap any sampler that is not a ``DistributedSampler`` in its
  ``DistributedSamplerWrapper``, which reorders it; instead every rank runs the same GraBSampler (same
  seed) inside a :class:`~torchgrab.integrations._ranks.RankShard` (a ``DistributedSampler``, which
  Lightning leaves alone) that hands rank r batches r, r + W, ... of the shared order;
- watches the LightningModule (:meth:`GraBSampler.watch`): each batch begins a step at
  ``on_train_batch_start`` (a ``training_step`` need not call ``self(x)``), a fp16 ``GradScaler`` is passed
  on, and the loss division of gradient accumulation is undone so each row is its example's own
  gradient; with several processes the rows of every rank are all-gathered after each batch, so every
  replica of the sampler is fed all of them in its yield order and the replicas stay equal;
- saves the sampler's state in the callback's checkpoint entry and loads it before the resumed epoch
  draws its first index. Lightning resumes a mid-epoch checkpoint of a plain ``DataLoader`` with a
  fresh iterator of which it takes as many batches as were left: the sampler continues the saved epoch
  after its last trained index, so the resumed run sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any, Dict, Iterator, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from torchgrab._versions import warn_if_untested
from torchgrab.errors import StateDictError, UnsupportedInputError
from torchgrab.integrations._ranks import RankShard, world
from torchgrab.sampler import GraBSampler

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the standalone package, or neither
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError(
            "torchgrab.integrations.lightning needs PyTorch Lightning: pip install 'torchgrab[lightning]'"
        ) from e

_data = importlib.import_module(f"{pl.__name__}.utilities.data")
_states = importlib.import_module(f"{pl.__name__}.trainer.states")


# The oldest Lightning whose tests pass (docs/integrations.md): with 2.0.9 its resume tests fail.
TESTED_LIGHTNING = (2, 5)


class GraBCallback(pl.Callback):
    """Train with GraB orders: ``Trainer(callbacks=[GraBCallback()])``.

    Args:
        watch: keyword arguments for :meth:`GraBSampler.watch` (``sketch``, ``per_layer``, ``exclude``,
            ...); the precision plugin's ``GradScaler`` (``precision="16-mixed"`` on a GPU) is passed for you.
        **sampler_kwargs: keyword arguments for :class:`GraBSampler` (``ordering="pair"``, ...); the seed
            defaults to the one of ``lightning.seed_everything`` (``PL_GLOBAL_SEED``), else 0.

    ``trainer.fit(model, ckpt_path=...)`` continues the exact order of the interrupted run, from a
    checkpoint taken mid-epoch or at an epoch's end. After ``fit``, ``callback.sampler`` is the sampler.
    """

    def __init__(self, watch: Optional[Dict[str, Any]] = None, **sampler_kwargs: Any) -> None:
        warn_if_untested("Lightning", pl.__version__, TESTED_LIGHTNING, "GraBCallback")
        for name in ("data_source", "n"):
            if name in sampler_kwargs:
                raise UnsupportedInputError(
                    f"GraBCallback takes the data set from the training DataLoader; do not pass {name}="
                )
        _check_names(GraBSampler.__init__, sampler_kwargs, "GraBSampler")
        _check_names(GraBSampler.watch, watch or {}, "GraBSampler.watch (watch=)")
        self.watch_kwargs = dict(watch or {})
        self.sampler_kwargs = dict(sampler_kwargs)
        self.sampler: Optional[GraBSampler] = None
        self.handle: Optional[Any] = None
        self._trainer: Optional[Any] = None
        self._size = 1  # processes that run the sampler (set when the loader is built)
        self._state_to_load: Optional[Dict[str, Any]] = None
        self._source: Optional[Any] = None  # the fit loop's data source while its dataloader() is wrapped

    # --------------------------------------------------------------- the training DataLoader
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        kinds = (pl.strategies.SingleDeviceStrategy, pl.strategies.DDPStrategy)
        if not isinstance(strategy, kinds) or "DeepSpeed" in type(strategy).__name__:
            raise UnsupportedInputError(
                f"GraBCallback supports single-device and DDP strategies (ddp, ddp_spawn, ...), not "
                f"{type(strategy).__name__}: watch() needs each example's gradient from the whole model"
            )
        self._trainer = trainer
        source = trainer.fit_loop._data_source
        self._unwrap()
        original = source.dataloader

        def dataloader() -> Any:
            # Called by the fit loop under Lightning's argument-capturing context, before it injects a
            # distributed sampler and before the loader is iterated.
            return self._install(trainer, pl_module, original())

        source.__dict__["dataloader"] = dataloader  # an instance attribute shadows the method
        self._source = source

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        self._unwrap()
        if self.handle is not None:
            self.handle.remove()  # feeds what is left; the model is left as it was (handle.layers etc. stay)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Lightning skips the teardown hooks when fit raises: leave neither hooks nor the wrapper behind.
        self._unwrap()
        if self.handle is not None and not self.handle.removed:
            if self._size > 1:
                # Feeding would all-gather with ranks that may never get here; the rows of every finished
                # batch were fed at its end (on_train_batch_end), so only the failed batch's are dropped.
                self.handle.discard()
            elif _batch_unprocessed(trainer):
                # Lightning trains a batch that failed before its optimizer step again on resume, even one
                # whose backward completed (the step itself raised): its rows are not fed.
                self.handle._retract_open_step()
            # remove() feeds the rows of the batches before, so that a checkpoint taken now
            # (OnExceptionCheckpoint, whose hook runs after this one) resumes at the failed batch.
            self.handle.remove()

    def _unwrap(self) -> None:
        if self._source is not None:
            self._source.__dict__.pop("dataloader", None)
            self._source = None

    def _install(self, trainer: Any, pl_module: Any, loader: Any) -> Any:
        if not isinstance(loader, DataLoader):
            raise UnsupportedInputError(
                "GraBCallback needs the training data to be one torch DataLoader (not "
                f"{type(loader).__name__}): GraB orders the indices of one data set"
            )
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise UnsupportedInputError(
                "GraBCallback needs a map-style data set with a length; an IterableDataset has no indices to order"
            )
        if loader.batch_size is None:
            raise UnsupportedInputError(
                "GraBCallback needs a DataLoader made with batch_size= (not batch_sampler="
                f"{type(loader.batch_sampler).__name__}): the sampler's order is cut into consecutive batches"
            )
        size, rank = world()
        stateful = callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))
        if size > 1 and stateful:
            raise UnsupportedInputError(
                "GraBCallback with several processes takes a plain torch DataLoader, not a stateful one "
                f"({type(loader).__name__}); the sampler's state is checkpointed by the callback"
            )
        sampler = self._sampler_for(dataset)
        self._size = size
        self._watch(trainer, pl_module, sampler, size)
        if self._state_to_load is not None:
            state, self._state_to_load = self._state_to_load, None
            # A stateful loader restores an older snapshot of the sampler when it is iterated; the
            # callback's state is the one taken at the checkpoint itself.
            sampler.load_state_dict(state, newer_than_loader=stateful)
        if size > 1:
            new: Any = RankShard(sampler, loader.batch_size, size, rank, drop_last=loader.drop_last)
        elif isinstance(trainer.strategy, pl.strategies.DDPStrategy):
            new = _WholeOrder(sampler)  # DDP on one process would still shuffle a plain sampler
        else:
            new = sampler
        return _data._update_dataloader(loader, new, mode=_states.RunningStage.TRAINING)

    def _sampler_for(self, dataset: Any) -> GraBSampler:
        n = len(dataset)
        if self.sampler is not None:
            if self.sampler.n != n:
                raise UnsupportedInputError(
                    f"the training data set changed size ({self.sampler.n} -> {n} examples); GraB orders one "
                    "fixed data set (use a new GraBCallback for another)"
                )
            return self.sampler
        kwargs = dict(self.sampler_kwargs)
        kwargs.setdefault("seed", int(os.environ.get("PL_GLOBAL_SEED", 0)))
        self.sampler = GraBSampler(dataset, **kwargs)
        return self.sampler

    def _watch(self, trainer: Any, pl_module: Any, sampler: GraBSampler, size: int) -> None:
        if self.handle is not None and not self.handle.removed and self.handle.model is pl_module:
            return
        if self.handle is not None:
            self.handle.remove()
        kwargs = dict(self.watch_kwargs)
        if "scaler" not in kwargs:
            kwargs["scaler"] = getattr(trainer.precision_plugin, "scaler", None)
        if size > 1:
            kwargs["all_ranks"] = True  # every rank's replica is fed every rank's rows
        handle = sampler.watch(pl_module, **kwargs)
        handle.loss_factor = self._loss_factor
        self.handle = handle

    def _loss_factor(self) -> float:
        # Lightning's automatic optimization divides every batch's loss by accumulate_grad_batches (also
        # in an epoch's last, shorter accumulation); manual optimization leaves the loss to the user.
        trainer = self._trainer
        module = trainer.lightning_module
        return float(trainer.accumulate_grad_batches) if module.automatic_optimization else 1.0

    # --------------------------------------------------------------- steps and epochs
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # A second fit on the same Trainer keeps its loader (no new request): watch the model again.
        if self.sampler is not None and (self.handle is None or self.handle.removed):
            self._watch(trainer, pl_module, self.sampler, self._size)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        # Lightning calls set_epoch on any sampler of the train loader that has one; this keeps the
        # sampler's epochs numbered as the Trainer's if that ever changes (same number: no effect).
        if self.sampler is not None and self._size == 1:
            self.sampler.set_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.handle is not None and not self.handle.removed:
            # Each batch is a step even when training_step never calls the module itself (self.net(x)),
            # so the watch's forward pre-hook would not fire; a call of self(x) then joins this step.
            self.handle._begin_batch(pl_module, batch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        handle = self.handle
        if handle is None or handle.removed:
            return
        step = handle._step
        if step.grads == 0 and step.noted is None and step.batch:
            # No backward reached the model (training_step returned None): the batch's examples got no
            # gradient. They are skipped, in order, rather than matched to the next batch's rows.
            if self._size > 1:
                raise UnsupportedInputError(
                    "GraBCallback with several processes needs a backward on every batch (training_step returned None)"
                )
            handle.flush()
            handle._step = type(step)()
            self.sampler._skip(step.batch)
        elif self._size > 1:
            # Every rank feeds here, after each batch, so the all-gather of rows happens at one point all
            # ranks reach together, never inside a forward that only some ranks run (a rank-zero callback).
            handle.flush()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.handle is not None and not self.handle.removed:
            self.handle.flush()

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        if self.sampler is None:
            return {}
        return {"sampler": self.sampler.state_dict(), "world_size": self._size}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if "sampler" not in state_dict:
            raise StateDictError("the checkpoint's GraBCallback entry holds no sampler state")
        state = state_dict["sampler"]
        saved_size = int(state_dict.get("world_size", 1))
        size, _ = world()
        mid_epoch = bool(state.get("in_epoch")) and int(state.get("stepped", 0)) < _epoch_length(state)
        if saved_size != size and mid_epoch:
            raise StateDictError(
                f"the checkpoint was taken mid-epoch by {saved_size} process(es); resume it with the same number "
                f"of processes (this run has {size}), or resume from a checkpoint taken at an epoch's end"
            )
        if self.sampler is not None:
            self.sampler.load_state_dict(state)
        else:
            self._state_to_load = state  # loaded when the training loader is built, before its first index


class _WholeOrder(DistributedSampler):
    """The sampler's order unchanged, as a ``DistributedSampler`` of one replica: a DDP strategy on a single
    process wraps any other sampler in ``DistributedSamplerWrapper``, which shuffles it."""

    def __init__(self, sampler: GraBSampler) -> None:  # DistributedSampler's constructor is not called
        self.sampler = sampler
        self.num_replicas, self.rank, self.epoch, self.shuffle, self.drop_last = 1, 0, 0, False, False
        self.num_samples = self.total_size = len(sampler)
        self.seed = sampler.seed

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        return iter(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)


def _batch_unprocessed(trainer: Any) -> bool:
    """Whether the training batch in flight began and has not passed its optimizer step: Lightning's batch
    progress then says started > processed, and a resumed fit trains that batch again."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(progress.processed) < int(progress.started)


def _epoch_length(state: Dict[str, Any]) -> int:
    native = state.get("native", {})
    current = native.get("current") if isinstance(native, dict) else None
    return int(current.numel()) if isinstance(current, torch.Tensor) else 0


def _check_names(fn: Any, kwargs: Dict[str, Any], what: str) -> None:
    params = inspect.signature(fn).parameters
    unknown = sorted(k for k in kwargs if k not in params or k == "self")
    if unknown:
        raise UnsupportedInputError(f"{what} takes no argument {', '.join(unknown)}")
