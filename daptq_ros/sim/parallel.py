"""Process pools for episode-level parallelism (spawn start method) with an in-process fallback.

MuJoCo GL contexts and ONNX Runtime / torch thread pools do not survive ``fork``, so workers are
spawned. With ``workers == 1`` jobs run in the calling process through the same interface, which
avoids the spawn cost (imports, policy loading) for small runs and tests.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from typing import Any


class InlineExecutor(Executor):
    """Runs each submitted job immediately in this process.

    Args:
        initializer: called once with ``initargs`` (like a pool worker initializer).
        initargs: its arguments.
        finalizer: called once on :meth:`shutdown` (e.g. to close cached envs).
    """

    def __init__(
        self,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        finalizer: Callable[[], Any] | None = None,
    ) -> None:
        self._finalizer = finalizer
        if initializer is not None:
            initializer(*initargs)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` now; its result or exception lands in the returned future."""
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Run the finalizer once."""
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer()


def make_executor(
    workers: int,
    initializer: Callable[..., Any],
    initargs: tuple,
    finalizer: Callable[[], Any] | None = None,
) -> Executor:
    """A spawn process pool of ``workers`` processes, or an :class:`InlineExecutor` for 1.

    ``finalizer`` only runs in the inline case; pool workers must register their own cleanup
    (``atexit``) in ``initializer``.
    """
    if workers <= 1:
        return InlineExecutor(initializer, initargs, finalizer)
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=mp.get_context("spawn"), initializer=initializer, initargs=initargs
    )


def imap_unordered(
    executor: Executor,
    fn: Callable[..., Any],
    jobs: Iterable[tuple],
    max_inflight: int,
) -> Iterator[Any]:
    """Submit ``fn(*job)`` for every job, at most ``max_inflight`` at a time, in job order, and
    yield results as they complete (jobs submitted in order keep a worker on one task, so its
    cached env is reused)."""
    pending = iter(jobs)
    inflight: set[Future] = set()
    exhausted = False
    while True:
        while not exhausted and len(inflight) < max(1, max_inflight):
            job = next(pending, None)
            if job is None:
                exhausted = True
                break
            inflight.add(executor.submit(fn, *job))
        if not inflight:
            return
        done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
        for fut in done:
            yield fut.result()
