"""The sampler's lock, and the one balancing step it may let run in the background.

``GraBSampler.step(..., non_blocking=True)`` (and ``backward``) hands the step to a worker thread and returns, so
the Rust kernel (which releases the GIL) balances this batch while the training loop computes the next
one. Everything else that reads or changes the sampler goes through this lock, and entering it first
waits for that step: every method sees the state after it, and a step the kernel refused raises there,
at the next call, after the caller's bookkeeping for it has been undone (the kernel's own steps are all
or nothing), so the sampler is exactly as it was before that step.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Tuple


class StepLock:
    """A re-entrant lock that also holds at most one step running in the background."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._job: Optional[Tuple[Future, Callable[[], None]]] = None
        self._worker: Optional[ThreadPoolExecutor] = None

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

    def submit(self, work: Callable[[], None], undo: Callable[[], None]) -> None:
        """Run ``work`` on the worker thread (call with the lock held, after ``wait``). If it raises,
        ``undo`` runs before the error is raised by the next ``wait``."""
        assert self._job is None, "a background step is still running"
        if self._worker is None:
            # One worker per sampler: steps run in submission order, one at a time.
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchgrab-step")
        started = threading.Event()

        def run() -> None:
            started.set()
            work()  # holds the GIL only until the kernel releases it

        self._job = (self._worker.submit(run), undo)
        # Hand the GIL over until the worker is on its way into the kernel. Otherwise the worker waits
        # for it while this thread runs the training loop's Python, up to the interpreter's switch
        # interval (5 ms), longer than a whole step of a small model: nothing would overlap.
        started.wait()

    def wait(self) -> None:
        """Wait for the background step, if any; raise its error (after its ``undo``) if it failed."""
        if self._job is None:
            return
        with self._lock:
            if self._job is None:
                return
            future, undo = self._job
            self._job = None
            error = future.exception()
            if error is not None:
                undo()
                error.add_note(
                    "(raised by an earlier step that ran in the background, non_blocking=True; that step "
                    "changed nothing in the sampler, but a backward() had already handed its batch's mean "
                    "gradient to the model)"
                )
                raise error
