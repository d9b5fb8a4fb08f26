"""Batch files written on a thread of their own, so the encoders' thread never waits for a copy to the host, a numpy
save or an fsync.

The queue is bounded: at most `depth` embedded batches wait (on the device until the writer copies them), so memory
stays flat and a slow disk slows the encoders down instead of filling memory. Nothing is lost: leaving the `with`
block, by an error too, writes every batch already handed over before the block exits. A write that fails is raised
on the encoders' thread, at the next `put` or at the exit; batches handed over after a failure are not written (the
next run computes them again).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import numpy as np

from fusion.cache.partial import PartialCache
from fusion.extract.embedding import to_host

DEPTH = 2
_STOP = object()


class BatchWriter:
    """with BatchWriter(partial, on_written) as writer: writer.put(rows, arrays, skipped)"""

    def __init__(self, partial: PartialCache, on_written: Callable[[int], None] | None = None, *, depth: int = DEPTH):
        self._partial, self._on_written = partial, on_written
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fusion-batch-writer", daemon=True)

    def __enter__(self) -> "BatchWriter":
        self._thread.start()
        return self

    def put(self, rows: np.ndarray, arrays: dict, skipped: dict[int, str]) -> None:
        """Hands one batch over (rows: every row of the batch, skipped ones included; arrays: tensors or arrays in
        the order of the embedded rows); blocks while `depth` batches wait."""
        self._raise_failure()
        self._queue.put((rows, arrays, skipped))

    def __exit__(self, kind, error, traceback) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        if error is None:
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is not None:
                continue  # keep taking batches so the encoders' thread never blocks on a writer that has failed
            rows, arrays, skipped = item
            try:
                self._partial.write_batch(rows, to_host(arrays), skipped)
                if self._on_written:
                    self._on_written(len(rows))
            except BaseException as failure:  # noqa: BLE001 - handed to the encoders' thread, raised there
                self._error = failure
