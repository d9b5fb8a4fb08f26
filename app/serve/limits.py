"""The upload limit of `fusion serve`, enforced while the body arrives, so no request body is ever held whole.

Starlette's own body limit answers a declared-too-large body in plain text; the API answers every refusal as JSON,
so this small ASGI middleware does both checks: the declared Content-Length before reading anything, and the bytes
actually received (a chunked body declares none) as they come.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
                    # answers them (serve.py), and the spooled parts read so far are closed with the request.
                    raise HTTPException(413, self.message())
            return message

        await self.app(scope, counted, send)
