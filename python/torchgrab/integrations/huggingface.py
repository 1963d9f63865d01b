"""GraB inside the Hugging Face ``Trainer``: ``enable_grab(trainer)`` before ``trainer.train()``.

What it does behind the Trainer's back, and why:

- installs a :class:`~torchgrab.GraBSampler` as the training sampler (``_get_train_sampler``; before
  transformers 4.52 it takes no argument, from 4.52 the data set), not a ``RandomSampler`` subclass, so
  accelerate keeps it;
- watches the model (:meth:`GraBSampler.watch`), unscaling fp16 ``GradScaler`` steps and dropping
  skipped ones, and undoing the Trainer's per-step loss normalization (the accumulation steps of the
  epoch's last, shorter update, or ``num_items_in_batch``) so each row is its example's own gradient;
- with several processes, where every rank runs the whole sampler and keeps every W-th batch
  (accelerate's ``BatchSamplerShard``), all-gathers the rows each step so every rank builds the same
  next order from all ranks' rows, and drops the rows of the repeats that pad the last round;
- saves the sampler's state into ``checkpoint-N/`` on every save and, when ``train`` resumes from a
  checkpoint, loads it so that the Trainer's skipping of the resumed epoch's first batches runs over
  exactly the order the interrupted run had.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, Optional, Tuple

import torch

from torchgrab._versions import warn_if_untested
from torchgrab.errors import StateDictError, UnsupportedInputError
from torchgrab.integrations._ranks import world
from torchgrab.sampler import GraBSampler

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "torchgrab.integrations.huggingface needs transformers and accelerate: pip install 'torchgrab[huggingface]'"
    ) from e

SAMPLER_FILE = "torchgrab_sampler.pt"


# The oldest transformers a test runs (tests/test_integration_huggingface.py, test_transformers_before_4_52;
# docs/integrations.md, "Versions").
TESTED_TRANSFORMERS = (4, 51)


def enable_grab(trainer: Any, *, watch: Optional[Dict[str, Any]] = None, **sampler_kwargs: Any) -> GraBSampler:
    """Train ``trainer`` with GraB orders; call before ``trainer.train()``. Returns the sampler.

    Args:
        trainer: a ``transformers.Trainer`` whose ``train_dataset`` has a length.
        watch: keyword arguments for :meth:`GraBSampler.watch` (``sketch``, ``per_layer``, ``exclude``,
            ...); the Trainer's own fp16 scaler is passed for you.
        **sampler_kwargs: keyword arguments for :class:`GraBSampler` (``ordering="pair"``, ...); the
            seed defaults to ``TrainingArguments.data_seed``, or ``seed`` when that is not set.

    Every process of a multi-process run calls it the same way. Resuming with
    ``trainer.train(resume_from_checkpoint=...)`` continues the exact order of the interrupted run.
    """
    import transformers  # here: transformers replaces its lazy module in sys.modules after the first import

    warn_if_untested("transformers", transformers.__version__, TESTED_TRANSFORMERS, "enable_grab()")
    if getattr(trainer, "_torchgrab_sampler", None) is not None:
        raise UnsupportedInputError("enable_grab() was already called on this Trainer")
    dataset = trainer.train_dataset
    if dataset is None or not hasattr(dataset, "__len__") or isinstance(dataset, torch.utils.data.IterableDataset):
        raise UnsupportedInputError(
            "enable_grab() needs a train_dataset with a length (a map-style data set); GraB orders indices"
        )
    args = trainer.args
    size, _ = world()
    if size > 1:
        dispatch = getattr(getattr(trainer, "accelerator", None), "dispatch_batches", None)
        if dispatch:
            raise UnsupportedInputError(
                "enable_grab() with several processes needs every rank to run the sampler "
                "(accelerator_config={'dispatch_batches': False})"
            )
        if getattr(args, "accelerator_config", None) is not None and getattr(
            args.accelerator_config, "split_batches", False
        ):
            raise UnsupportedInputError("enable_grab() needs accelerator_config split_batches=False")
    if getattr(args, "group_by_length", False) or getattr(args, "train_sampling_strategy", None) == "group_by_length":
        raise UnsupportedInputError(
            "enable_grab() replaces the training sampler; group_by_length orders by length instead: turn it off"
        )
    # The Trainer seeds its data order with data_seed when it is set (else seed): so does the sampler.
    data_seed = getattr(args, "data_seed", None)
    sampler_kwargs.setdefault("seed", int(args.seed if data_seed is None else data_seed))
    sampler = GraBSampler(dataset, **sampler_kwargs)
    watch_kwargs = dict(watch or {})
    if "scaler" not in watch_kwargs:
        watch_kwargs["scaler"] = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    callback = _GraBCallback(trainer, sampler, watch_kwargs, size > 1)
    # Now, so that a model watch() cannot sketch is refused before the Trainer is touched.
    callback.attach()
    # The Trainer builds its training DataLoader from this method (it takes the data set from 4.52 on).
    trainer._get_train_sampler = lambda *a, **k: sampler
    trainer.add_callback(callback)
    callback.wrap_loss()
    original_train = trainer.train

    @functools.wraps(original_train)
    def train(resume_from_checkpoint: Any = None, *a: Any, **k: Any) -> Any:
        callback.resume_from = _resolve_checkpoint(trainer, resume_from_checkpoint)
        return original_train(resume_from_checkpoint, *a, **k)

    trainer.train = train
    trainer._torchgrab_sampler = sampler
    return sampler


def _resolve_checkpoint(trainer: Any, resume: Any) -> Optional[str]:
    """The checkpoint folder ``Trainer.train(resume_from_checkpoint=...)`` will load, as it resolves it."""
    if resume is None or resume is False:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        found = get_last_checkpoint(trainer.args.output_dir)
        return found  # None: the Trainer raises its own error
    return str(resume)


class _GraBCallback(TrainerCallback):
    """Checkpoints the sampler with the Trainer's checkpoints and feeds the last rows at the end."""

    def __init__(self, trainer: Any, sampler: GraBSampler, watch: Dict[str, Any], exchange: bool) -> None:
        self.trainer = trainer
        self.sampler = sampler
        self.watch = watch
        self.exchange = exchange
        self.handle: Any = None
        self.resume_from: Optional[str] = None
        self._factor: Any = 1.0
        self._computed: Optional[Tuple[torch.Tensor, float]] = None
        self._by_items: Optional[bool] = None  # the loss is normalized by num_items_in_batch

    def attach(self) -> None:
        """Watch the model for the length of a ``train()`` call (forwards and backwards after it, an
        evaluation or the user's own, feed nothing)."""
        if self.handle is not None and not self.handle.removed:
            return
        self.handle = self.sampler.watch(self.trainer.model, all_ranks=self.exchange, **self.watch)
        self.handle.loss_factor = self.loss_factor

    # --------------------------------------------------------------- loss normalization per step
    def wrap_loss(self) -> None:
        """Learn, step by step, what the backward's loss was divided by beyond a mean over the batch.

        Two numbers, measured rather than read off the Trainer's version: the ratio of the loss
        ``compute_loss`` returned to the loss ``accelerator.backward`` got (the Trainer divides by the
        accumulation steps of the update, or not, depending on its version and the model), and whether
        the loss itself is normalized by ``num_items_in_batch`` (token-level losses are, a sequence
        classifier's mean is not; probed once by two no-grad evaluations of the first batch).
        """
        t = self.trainer
        compute_loss = t.compute_loss
        backward = t.accelerator.backward

        @functools.wraps(compute_loss)
        def wrapped_compute_loss(model: Any, inputs: Any, *a: Any, **k: Any) -> Any:
            training = model.training and torch.is_grad_enabled()
            items = k.get("num_items_in_batch", a[1] if len(a) > 1 else None)
            rows = _batch_rows(inputs)
            if training and items is not None and self._by_items is None:
                # A copy of the dict: compute_loss may pop the labels out of it.
                probe = dict(inputs) if isinstance(inputs, dict) else inputs
                self._by_items = _normalized_by_items(compute_loss, model, probe, items)
            out = compute_loss(model, inputs, *a, **k)
            if training:
                loss = out[0] if isinstance(out, tuple) else out
                per_batch = float(items) / rows if items is not None and self._by_items and rows else 1.0
                self._computed = (loss.detach(), per_batch)
            return out

        @functools.wraps(backward)
        def wrapped_backward(loss: Any, *a: Any, **k: Any) -> Any:
            if self._computed is not None:
                computed, per_batch = self._computed
                self._computed = None
                ratio = computed.to(loss.device, torch.float32) / loss.detach().float()
                # A tensor (no device sync); a zero loss (ratio not finite) keeps its rows unscaled.
                self._factor = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio)) * per_batch
            else:
                self._factor = 1.0
            return backward(loss, *a, **k)

        t.compute_loss = wrapped_compute_loss
        t.accelerator.backward = wrapped_backward

    def loss_factor(self) -> Any:
        return self._factor

    # --------------------------------------------------------------- checkpoints
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.attach()
        if self.resume_from is None:
            return
        path = os.path.join(self.resume_from, SAMPLER_FILE)
        if not os.path.isfile(path):
            raise StateDictError(
                f"{self.resume_from} has no {SAMPLER_FILE}: it was not saved by a Trainer with enable_grab(), so "
                "the order of the interrupted epoch cannot be rebuilt"
            )
        state_dict = torch.load(path, weights_only=True)
        # The Trainer skips the resumed epoch's first batches by iterating the sampler from the epoch's
        # start again (skip_first_batches): the sampler hands that epoch out again from its first index.
        self.sampler.load_state_dict(state_dict, replay_epoch=True)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        state_dict = self.sampler.state_dict()  # every rank: feeding the last rows may be a collective
        if state.is_world_process_zero:
            run_dir = (
                self.trainer._get_output_dir(None) if hasattr(self.trainer, "_get_output_dir") else args.output_dir
            )
            folder = os.path.join(run_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(state_dict, os.path.join(folder, SAMPLER_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.handle.remove()  # feeds the last step's rows first


def _batch_rows(inputs: Any) -> int:
    values = inputs.values() if isinstance(inputs, dict) else [inputs]
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 0


def _normalized_by_items(compute_loss: Any, model: Any, inputs: Any, items: Any) -> bool:
    """Whether ``compute_loss`` divides by ``num_items_in_batch``: evaluated with it and with twice it
    (eval mode, no grad, the RNG state restored: training is not disturbed)."""
    twice = items * 2
    inputs_again = dict(inputs) if isinstance(inputs, dict) else inputs
    modes = [(m, m.training) for m in model.modules()]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        model.eval()
        try:
            first = compute_loss(model, inputs, num_items_in_batch=items)
            second = compute_loss(model, inputs_again, num_items_in_batch=twice)
        finally:
            for m, mode in modes:
                m.training = mode
    first = first[0] if isinstance(first, tuple) else first
    second = second[0] if isinstance(second, tuple) else second
    return bool(torch.isclose(first.float(), 2 * second.float(), rtol=1e-3).item()) and bool(
        first.float().abs().item() > 0
    )
