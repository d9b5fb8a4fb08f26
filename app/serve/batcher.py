"""Requests that arrive together share one forward pass.

Each request submits a job (one or more items) from the event loop; one worker thread takes the first job waiting,
keeps gathering jobs for a short window or until the batch is full, runs them as one batch, and hands every job its
own results. Under load the queue fills while a batch runs, so batches grow with the number of clients.

The window stays open only while other items are on their way: a request announces its items when it starts
preparing them (decoding an upload takes a few ms) and submits them when ready. With nothing announced and nothing
queued a batch starts at once, so a lone client never waits for company that is not coming.

A job whose request was cancelled (its client left, or its deadline passed: app/serve/guard.py) is dropped before it
is computed. A batch that raises is run again item by item, so one bad item fails alone: its result is the exception
it raised, and every other item is answered.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

_STOP = object()


@dataclass
class _Job:
    items: Sequence
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """run_batch(items) -> one result per item, called on the worker thread only (so the models it uses never run
    two forwards at once). A job is never split across batches; one larger than max_batch runs alone."""

    def __init__(self, run_batch: Callable[[list], list], *, max_batch: int = 32, wait_s: float = 0.005):
        if max_batch < 1 or wait_s < 0:
            raise ValueError("max_batch must be at least 1 and wait_s not negative")
        self.run_batch, self.max_batch, self.wait_s = run_batch, max_batch, wait_s
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # keeps `_announced` and the queue consistent for the worker's look at both
        self._announced = 0  # items being prepared by requests, not yet submitted
        self._waiting = 0  # items submitted, not yet taken into a batch
        self._carried: _Job | None = None  # the job that did not fit the last batch: first in the next
        self._thread = threading.Thread(target=self._work, name="fusion-batcher", daemon=True)
        self.batches_run = 0  # with items_run: the mean batch size, for the benchmark and tests
        self.items_run = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Asks the worker to finish after its batch; waits at most `timeout` seconds (a forward that never returns
        must not hold the server's shutdown: the thread is a daemon). True when it has finished."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Items submitted and not yet in a batch."""
        with self._lock:
            return self._waiting

    def announce(self, count: int) -> None:
        """`count` items are being prepared and will be submitted (announced=) or withdrawn."""
        with self._lock:
            self._announced += count

    def withdraw(self, count: int) -> None:
        """Announced items that will not come (their input was refused, or the client left)."""
        self.announce(-count)

    async def submit(self, items: Sequence, *, announced: int = 0) -> list:
        """The results of `items`, one per item; an item that failed (alone, see the module's docstring) has the
        exception it raised as its result. announced: how many of them were announced. Cancelling the caller
        drops the job if its batch has not started."""
        loop = asyncio.get_running_loop()
        job = _Job(items=items, loop=loop, future=loop.create_future())
        with self._lock:
            self._announced -= announced
            self._waiting += len(items)
            self._queue.put(job)
        return await job.future

    def _nothing_coming(self) -> bool:
        with self._lock:
            return self._announced <= 0 and self._queue.empty()

    def _work(self) -> None:
        while True:
            jobs = self._gather()
            if jobs is None:
                return
            self._run(jobs)

    def _gather(self) -> list[_Job] | None:
        first = self._carried or self._taken(self._queue.get())
        self._carried = None
        if first is _STOP:
            return None
        jobs, size = [first], len(first.items)
        deadline = time.monotonic() + self.wait_s
        while size < self.max_batch and not self._nothing_coming():
            try:
                job = self._taken(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
            if job is _STOP or size + len(job.items) > self.max_batch:
                self._carried = job
                break
            jobs.append(job)
            size += len(job.items)
        return jobs

    def _taken(self, job):
        if job is not _STOP:
            with self._lock:
                self._waiting -= len(job.items)
        return job

    def _run(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.future.done()]  # cancelled: the client left or its deadline passed
        items = [item for job in jobs for item in job.items]
        if not items:
            return
        self.batches_run += 1
        self.items_run += len(items)
        try:
            results = list(self.run_batch(items))
        except Exception as error:  # noqa: BLE001 - the worker lives on; each item is tried alone
            results = [error] if len(items) == 1 else [self._alone(item) for item in items]
        start = 0
        for job in jobs:
            done = results[start:start + len(job.items)]
            start += len(job.items)
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, done)
            except RuntimeError:  # the request's event loop has closed (the server stopped meanwhile)
                pass

    def _alone(self, item):
        """One item of a batch that failed, run by itself: its result, or the exception it raises alone."""
        self.batches_run += 1
        try:
            return self.run_batch([item])[0]
        except Exception as error:  # noqa: BLE001 - this item's own failure is its answer
            return error


def _settle(future: asyncio.Future, results: list) -> None:
    if not future.done():  # else the request was cancelled (client gone, deadline) while its batch ran
        future.set_result(results)
