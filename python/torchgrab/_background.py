"""The sampler's lock, and the one balancing step it may have running in the background.

``GraBSampler.step(..., non_blocking=True)`` (and ``backward``) checks its input, hands the step to a
rayon worker (``NativeSampler.step_start``: the Rust side lends the sampler to the worker, with the
arrays it reads, and never needs the GIL there) and returns, so the kernel balances this batch while
the training loop computes the next one. Everything else that reads or changes the sampler goes
through this lock, and entering it first waits for that step (``NativeSampler.wait_step``): every
method sees the state after it, and a step the kernel refused raises there, at the next call, after
the Python bookkeeping for it has been undone (the kernel's steps are all or nothing), so the sampler
is exactly as it was before that step.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Tuple


class StepLock:
    """A re-entrant lock that also knows of at most one step running in the background."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._job: Optional[Tuple[Any, Callable[[], None]]] = None

    def __enter__(self) -> "StepLock":
        self._lock.acquire()
        try:
            self.wait()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    @property
    def busy(self) -> bool:
        """A background step has been started and not yet waited for."""
        return self._job is not None

    def started(self, native: Any, undo: Callable[[], None]) -> None:
        """``native.step_start`` has returned (call with the lock held): if the kernel refuses that step,
        ``undo`` runs before the next ``wait`` raises its error."""
        assert self._job is None, "a background step is still running"
        self._job = (native, undo)

    def wait(self) -> None:
        """Wait for the background step, if any; raise its error (after its ``undo``) if it failed."""
        if self._job is None:
            return
        with self._lock:
            if self._job is None:
                return
            native, undo = self._job
            self._job = None
            try:
                native.wait_step()  # releases the GIL while it waits
            except BaseException as error:
                undo()
                add_note(
                    error,
                    "(raised by an earlier step that ran in the background, non_blocking=True; that step "
                    "changed nothing in the sampler, but a backward() had already handed its batch's mean "
                    "gradient to the model)",
                )
                raise


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (PEP 678, Python 3.11+). Before 3.11 the note goes into ``__notes__`` as
    well, where code that reads notes looks, and at the end of the message, since tracebacks print no
    notes there; the exception keeps its type, which is what callers catch."""
    if hasattr(error, "add_note"):
        error.add_note(note)
        return
    notes = getattr(error, "__notes__", None)
    error.__notes__ = [*(notes or []), note]  # type: ignore[attr-defined]
    if error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]} {note}", *error.args[1:])
