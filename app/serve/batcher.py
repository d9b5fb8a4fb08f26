"""Requests that arrive together share one forward pass.

Each request submits a job (one or more items) from the event loop; one worker thread takes the first job waiting,
keeps gathering jobs for a short window or until the batch is full, runs them as one batch, and hands every job its
own results. Under load the queue fills while a batch runs, so batches grow with the number of clients.

The window stays open only while other items are on their way: a request announces its items when it starts
preparing them (decoding an upload takes a few ms) and submits them when ready. With nothing announced and nothing
queued a batch starts at once, so a lone client never waits for company that is not coming.
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
        self._carried: _Job | None = None  # the job that did not fit the last batch: first in the next
        self._thread = threading.Thread(target=self._work, name="fusion-batcher", daemon=True)
        self.batches_run = 0  # with items_run: the mean batch size, for the benchmark and tests
        self.items_run = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def announce(self, count: int) -> None:
        """`count` items are being prepared and will be submitted (announced=) or withdrawn."""
        with self._lock:
            self._announced += count

    def withdraw(self, count: int) -> None:
        """Announced items that will not come (their input was refused, or the client left)."""
        self.announce(-count)

    async def submit(self, items: Sequence, *, announced: int = 0) -> list:
        """The results of `items`, all computed in the same batch; run_batch's exception is raised here.
        announced: how many of them were announced."""
        loop = asyncio.get_running_loop()
        job = _Job(items=items, loop=loop, future=loop.create_future())
        with self._lock:
            self._announced -= announced
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
        first = self._carried or self._queue.get()
        self._carried = None
        if first is _STOP:
            return None
        jobs, size = [first], len(first.items)
        deadline = time.monotonic() + self.wait_s
        while size < self.max_batch and not self._nothing_coming():
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is _STOP or size + len(job.items) > self.max_batch:
                self._carried = job
                break
            jobs.append(job)
            size += len(job.items)
        return jobs

    def _run(self, jobs: list[_Job]) -> None:
        items = [item for job in jobs for item in job.items]
        self.batches_run += 1
        self.items_run += len(items)
        try:
            results = self.run_batch(items)
        except Exception as error:  # every waiting request learns of it; the worker lives on for the next batch
            for job in jobs:
                job.loop.call_soon_threadsafe(_settle, job.future, None, error)
            return
        start = 0
        for job in jobs:
            done = results[start:start + len(job.items)]
            start += len(job.items)
            job.loop.call_soon_threadsafe(_settle, job.future, done, None)


def _settle(future: asyncio.Future, results, error: BaseException | None) -> None:
    if future.done():  # the request was cancelled (client gone) while its batch ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(results)
