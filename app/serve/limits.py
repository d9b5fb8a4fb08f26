"""What `fusion serve` accepts and bounds (ServeLimits), with the command's defaults, and the Host names it answers.
No web framework is imported here: the command line reads the defaults without the `serve` extra installed. The checks
themselves are ASGI middlewares in app/serve/guard.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Well under Pillow's 89.5 MP: a 64 MP photo (8000 x 8000) is accepted, and decoding it holds one 256 MB image
# for a moment (extract/images.py reduces it right after); at most one decode per core runs at once.
DEFAULT_MAX_PIXELS = 64_000_000
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
ANY_HOST = "*"


@dataclass(frozen=True)
class ServeLimits:
    """Everything `fusion serve` bounds; the defaults are the command's."""
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_text_chars: int = 10_000
    max_queue: int = 64  # prediction requests in the server at once (receiving, decoding, waiting, in a batch)
    timeout_s: float = 30.0  # for a whole prediction request, from its first byte to its answer
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # names clients may reach the server by; "*": any
    max_batch: int = 32
    wait_s: float = 0.01  # how long a batch waits for posts announced but not yet prepared (app/serve/batcher.py)
    decoders: int = 0  # images decoded at once; 0: one per core this process may run on

    def decode_threads(self) -> int:
        if self.decoders > 0:
            return self.decoders
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def allowed_hosts(bound: str, extra: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The Host names accepted: the address the server is bound to (unless it is a wildcard, which no client
    names), the loopback names, and `extra` (--allow-host)."""
    names = [] if bound in ("0.0.0.0", "::", "") else [bound]
    return tuple(dict.fromkeys([*names, *LOOPBACK_NAMES, *extra]))


def host_name(header: str) -> str:
    """The name in a Host header, without its port: "example.org:8000" -> "example.org", "[::1]:80" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header
