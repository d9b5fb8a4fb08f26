"""The checks a request meets before the app (ASGI middlewares): the Host header, the upload's size, and for the
prediction routes a bounded number of requests inside the server, a deadline for each, and no work for a client that
has gone.

- Host: a request naming a host the server does not answer to is refused (400), so a page on another site cannot
  read the API through DNS rebinding (ServeLimits.allowed_hosts).
- Upload size: the declared Content-Length before anything is read, and the bytes actually received (a chunked body
  declares none) as they come (413); no request body is ever held whole.
- Admission: at most `max_queue` prediction requests are inside the server at once (receiving their body, decoding,
  waiting for or in an encoder batch). One more is answered 503 with Retry-After at once, before its body is read,
  so a burst costs a few bytes per refused request instead of memory and minutes of queueing.
- Deadline: a request not answered within `timeout_s` of its first byte (a slow upload included) is cancelled and
  answered 504.
- Disconnect: once the body is in, the client's connection is watched; when it closes, the request is cancelled.
  A cancelled request leaves the decode line and the batch queue at once, and its post is never computed
  (app/serve/slots.py, app/serve/batcher.py).

Starlette's own body limit and TrustedHostMiddleware answer in plain text; the API answers every refusal as JSON with
one line, so these are small middlewares of our own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fusion.app.serve.limits import ANY_HOST, host_name

RETRY_AFTER_S = 1


@dataclass
class Load:
    """What the guard counts, read by /ready and the load benchmark."""
    in_flight: int = 0  # prediction requests inside the server now
    refused: int = 0  # answered 503: over max_queue
    timed_out: int = 0  # answered 504
    dropped: int = 0  # cancelled because their client left


class RequestGuard:
    def __init__(self, app: ASGIApp, *, paths: tuple[str, ...], load: Load, max_queue: int, timeout_s: float):
        self.app, self.paths, self.load = app, frozenset(paths), load
        self.max_queue, self.timeout_s = max_queue, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.load.in_flight >= self.max_queue:
            self.load.refused += 1
            message = (f"server busy: {self.load.in_flight} requests already inside (fusion serve --max-queue "
                       f"{self.max_queue}); retry after {RETRY_AFTER_S} s")
            await JSONResponse({"error": message}, status_code=503,
                               headers={"Retry-After": str(RETRY_AFTER_S)})(scope, receive, send)
            return
        self.load.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.load.in_flight -= 1

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_in, answering = asyncio.Event(), asyncio.Event()

        async def tracked_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_in.set()
            return message

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answering.set()
            await send(message)

        task = asyncio.ensure_future(self.app(scope, tracked_receive, tracked_send))
        watcher = asyncio.ensure_future(_client_gone(body_in, answering, receive))
        try:
            done, _ = await asyncio.wait({task, watcher}, timeout=self.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if task not in done and answering.is_set():  # the answer is on its way: let it finish
                await asyncio.wait({task})
                done = {task}
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)  # its decode slot and batch job are let go
        if task in done:
            task.result()  # its exception, if any, reaches the server's error answers
        elif watcher in done:
            self.load.dropped += 1  # nobody is listening: nothing to send
        else:
            self.load.timed_out += 1
            message = f"no answer within the server's {self.timeout_s:g} s (fusion serve --timeout); try again later"
            await JSONResponse({"error": message}, status_code=504)(scope, receive, send)


async def _client_gone(body_in: asyncio.Event, answering: asyncio.Event, receive: Receive) -> None:
    """Returns when the client closes its connection before an answer has started; never otherwise."""
    await body_in.wait()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not answering.is_set():
                return
            await asyncio.Event().wait()  # the response completed (the server reports that as a disconnect too)


class HostCheck:
    """Refuses a request whose Host header is not among the allowed names (400, one JSON line)."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]):
        self.app, self.allowed = app, {name.lower() for name in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or ANY_HOST in self.allowed:
            await self.app(scope, receive, send)
            return
        name = host_name(Headers(scope=scope).get("host", ""))
        if name not in self.allowed:
            shown = name[:60] or "(none)"
            message = f"host {shown!r} is not served here (the server answers {', '.join(sorted(self.allowed))}; " \
                      f"fusion serve --allow-host NAME adds one)"
            await JSONResponse({"error": message}, status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class UploadLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def message(self) -> str:
        return f"upload over the server's limit of {self.max_bytes / 2**20:g} MB (fusion serve --max-upload-mb)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            # Answered before any byte is read; the connection is then closed with the rest of the body unread.
            await JSONResponse({"error": self.message()}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the form parser's read; FastAPI passes HTTPExceptions on to the handler that
                    # answers them (server.py), and the spooled parts read so far are closed with the request.
                    raise HTTPException(413, self.message())
            return message

        await self.app(scope, counted, send)
