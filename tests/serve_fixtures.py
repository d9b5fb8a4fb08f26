"""For the `fusion serve` tests: a tiny trained run (really extracted with the tiny encoders) and a real uvicorn
server for an app on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from dataset_writers import write_mvsa
from tiny_models import extract_argv

from fusion.app.serve.server import uvicorn_config
from fusion.cli import main


@dataclass(frozen=True)
class TinyRun:
    run: Path
    images: list[Path]  # the dataset's own images, as fixtures to upload
    texts: list[str]


def make_tiny_run(folder: Path, tiny_models, *, head: str = "self_attn", tokens: bool = False) -> TinyRun:
    """tokens: extract and fit on the token sequences (a dual_attn head then reports its attention)."""
    expected = write_mvsa(folder / "data", kind="single", n_per_class=6, dirty=False)
    cache = folder / "c.h5"
    with_tokens = ["--tokens"] if tokens else []
    assert main(extract_argv(expected.root, cache, tiny_models, *with_tokens)) == 0
    run = folder / "run"
    assert main(["fit", "--cache", str(cache), "--head", head, "--epochs", "3", "--out", str(run), *with_tokens]) == 0
    images = sorted((expected.root / "data").glob("*.jpg"), key=lambda path: int(path.stem))
    return TinyRun(run=run, images=images, texts=[expected.texts.get(path.stem, "a day") for path in images])


@contextmanager
def running_server(app, *, start_timeout: float = 60.0):
    """Yields the base URL of `app` served by uvicorn on 127.0.0.1 at a port the OS chose, configured as `fusion
    serve` configures it (the app's own limits); stops it afterwards.

    uvicorn opens the socket itself, as `fusion serve` does (asyncio turns Nagle's algorithm off only on sockets
    it creates with an explicit TCP protocol: on one made here each answer would wait ~40 ms for a delayed ACK)."""
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=0, limits=app.state.limits,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
