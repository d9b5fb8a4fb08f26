"""Decoding an upload runs on a thread of its own, at most one per core at once (ServeLimits.decoders): a burst of
64 MP images is decoded a few at a time, never all together.

A request waiting for a slot waits in the event loop, so cancelling it (its client left, its deadline passed) takes
it out of the line at once. A decode already running cannot be stopped: its slot is given back when it ends, not
when its request is cancelled, so the count of decodes at once holds even then.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class DecodeSlots:
    def __init__(self, count: int):
        if count < 1:
            raise ValueError("at least one decode slot")
        self.count = count
        self.running = 0  # decodes on a thread now (read by /ready)
        self._free = asyncio.Semaphore(count)
        self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="fusion-decode")

    async def run(self, function: Callable[..., Any], *args, **kwargs) -> Any:
        """function(*args, **kwargs) on a decode thread, once a slot is free; its result or its exception."""
        await self._free.acquire()
        loop = asyncio.get_running_loop()
        self.running += 1
        try:
            future = self._pool.submit(functools.partial(function, *args, **kwargs))
        except BaseException:
            self._given_back()
            raise
        future.add_done_callback(lambda _: self._give_back_from(loop))
        return await asyncio.wrap_future(future)

    def _give_back_from(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the decode thread: the slot goes back on the event loop's thread (asyncio objects are not
        thread-safe)."""
        try:
            loop.call_soon_threadsafe(self._given_back)
        except RuntimeError:  # the loop has closed: the server has stopped
            pass

    def _given_back(self) -> None:
        self.running -= 1
        self._free.release()

    def close(self) -> None:
        """Drops decodes not started; one running finishes on its thread (bounded by --max-pixels)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
