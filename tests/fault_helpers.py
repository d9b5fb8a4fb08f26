"""Helpers for the fault tests: `fusion` commands in child processes that a test can SIGKILL, cheaply.

Importing torch and transformers costs ~5 s per process on the CI machine. A multiprocessing *forkserver* imports them
once (it never runs a torch op, so forking it is safe) and forks every run from there in milliseconds; each child is
a separate process running `fusion.cli.main(argv)`, the function behind `python -m fusion.cli`. That makes a dozen
kills and resumes affordable in a test. The tests also run the real `python -m fusion.cli` where it matters.

    runner = CliRunner()                   # one per test module
    child = runner.start(["extract", ...], log=tmp_path / "run.log")
    child.kill(); child.join()             # exitcode -9: killed
    runner.close()
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import sys
import time
import zlib
from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

PRELOAD = ["fusion.cli", "fusion.app.console", "fusion.extract.pipeline", "fusion.app.grid",
           "fusion.heads.runs", "fault_helpers"]

# Figures for the closing note, printed at the end of each fault test module (visible with -s).
FIGURES: Counter = Counter()


def print_figures(module: str, since: Counter | None = None) -> None:
    """The module's own figures (those added since `since`, a copy of FIGURES taken at its start)."""
    own = FIGURES - (since or Counter())
    print(f"\n[fault figures] {module}: " + ", ".join(f"{k}={v}" for k, v in sorted(own.items())), flush=True)


def cli_child(argv: list[str], log: str, hold_after_first_batch: str | None = None, die_at: str | None = None) -> None:
    """Runs in the forked child: stdout and stderr go to `log`; the exit code is main()'s."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if hold_after_first_batch:
        _hold_after_first_batch(Path(hold_after_first_batch))
    if die_at:
        _die_at(die_at)
    from fusion.cli import main

    code = main(list(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _hold_after_first_batch(go_file: Path) -> None:
    """Makes this process keep its cache lock after one batch until `go_file` exists (a slow first writer)."""
    from fusion.cache.partial import PartialCache

    original = PartialCache.write_batch

    def write_batch(self, *args, **kwargs):
        original(self, *args, **kwargs)
        deadline = time.monotonic() + 120
        while not go_file.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    PartialCache.write_batch = write_batch


class _Dying:
    """Stands in for a module (`os`, `shutil`) inside one fusion module: the named function SIGKILLs the process
    on its `nth` call instead of running, everything else is the real module's."""

    def __init__(self, module, name: str, nth: int):
        self._module, self._name, self._nth, self._calls = module, name, nth, 0

    def __getattr__(self, attribute):
        real = getattr(self._module, attribute)
        if attribute != self._name:
            return real

        def dying(*args, **kwargs):
            self._calls += 1
            if self._calls >= self._nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return dying


# Deterministic kills in the narrow windows that random delays rarely hit.
DEATHS = {
    "atomic_rename": ("fusion.atomic", "os", "replace"),       # plan.json or a batch file written, not renamed
    "finalize_read": ("fusion.cache.writer", "np", "load"),    # finalize copying batches into the HDF5 temp
    "final_rename": ("fusion.cache.writer", "os", "replace"),  # the HDF5 temp written and fsynced, not renamed
    "cleanup": ("fusion.cache.writer", "shutil", "rmtree"),     # the cache renamed, the work folder not removed
}


def _die_at(spec: str) -> None:
    import importlib

    name, _, nth = spec.partition(":")
    module_name, attribute, function = DEATHS[name]
    module = importlib.import_module(module_name)
    setattr(module, attribute, _Dying(getattr(module, attribute), function, int(nth or 1)))


class CliRunner:
    def __init__(self):
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)

    def start(self, argv: list[str], *, log: Path, hold_after_first_batch: Path | None = None,
              die_at: str | None = None):
        """`die_at`: "atomic_rename:N", "finalize_read:N", "final_rename" or "cleanup" (see DEATHS)."""
        hold = str(hold_after_first_batch) if hold_after_first_batch else None
        child = self.context.Process(target=cli_child, args=(list(argv), str(log), hold, die_at))
        child.start()
        return child

    def run(self, argv: list[str], *, log: Path, timeout: float = 120) -> int:
        child = self.start(argv, log=log)
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise AssertionError(f"fusion {' '.join(argv[:1])} did not finish in {timeout} s; log: {log.read_text()}")
        return child.exitcode


def wait_until(condition, *, timeout: float, alive=None, poll: float = 0.001) -> bool:
    """Polls `condition` until it holds (True), `alive()` turns False, or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if alive is not None and not alive():
            return bool(condition())
        time.sleep(poll)
    return False



# ---------------------------------------------------------------- damaged caches (run in a subprocess)


def cache_snapshot(path: Path) -> dict:
    """Everything read_cache returns, as comparable bytes."""
    from fusion.cache.reader import read_cache

    data = read_cache(path, tokens=True)
    snapshot = {"attrs": data.attrs, "skipped": data.skipped}
    for split, arrays in data.splits.items():
        for name in ("text", "image", "label", "id", "text_tokens", "text_mask", "image_tokens"):
            value = getattr(arrays, name)
            snapshot[f"{split}/{name}"] = (value.dtype.str, value.shape, value.tobytes())
    return snapshot


def damage_survey(source: str, flips: int, truncations: int, seed: int) -> None:
    """Reads copies of a cache with one bit flipped at a random offset, then cut at evenly spaced lengths; prints a
    JSON tally. Each outcome must be a one-line CacheError naming the file or the very same contents; a read that
    hangs for 20 s ends the process (faulthandler) with the offset on stdout."""
    import faulthandler
    import json
    import random

    from fusion.errors import CacheError

    source_path = Path(source)
    original = source_path.read_bytes()
    reference = cache_snapshot(source_path)
    copy = source_path.with_name("damaged-" + source_path.name)
    rng = random.Random(seed)
    tally: Counter = Counter()
    cases = [("flip", rng.randrange(len(original)), rng.randrange(8)) for _ in range(flips)]
    cases += [("cut", len(original) * k // truncations, 0) for k in range(truncations)]  # 0 .. (n-1)/n of the file
    for kind, offset, bit in cases:
        data = bytearray(original)
        if kind == "flip":
            data[offset] ^= 1 << bit
        else:
            del data[offset:]
        copy.write_bytes(bytes(data))
        print(kind, offset, bit, flush=True)
        faulthandler.dump_traceback_later(20, exit=True)
        try:
            outcome = "same" if cache_snapshot(copy) == reference else "DIFFERENT"
        except CacheError as error:
            message = str(error)
            outcome = "refused" if "\n" not in message and str(copy) in message else f"BAD MESSAGE {message!r}"
        except Exception as error:  # noqa: BLE001 (the point is to see anything that is not a CacheError)
            outcome = f"UNCAUGHT {type(error).__name__}: {error}"
        faulthandler.cancel_dump_traceback_later()
        tally[f"{kind} {outcome}" if outcome in ("same", "refused") else f"{kind} at {offset}: {outcome}"] += 1
    print(json.dumps(tally), flush=True)


# ---------------------------------------------------------------- images that lie about themselves


def image_bytes(fmt: str, size=(20, 24)) -> bytes:
    buffer = BytesIO()
    pixels = np.random.default_rng(size[0]).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, colour_type: int = 2) -> bytes:
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def header_claiming(fmt: str, width: int, height: int) -> bytes:
    """A small real image of `fmt` whose header is patched to claim width x height pixels."""
    if fmt == "PNG":
        return png_claiming(width, height)
    data = bytearray(image_bytes(fmt, (16, 16)))
    if fmt == "GIF":  # logical screen and the first image descriptor
        data[6:10] = struct.pack("<HH", width, height)
        descriptor = _gif_image_descriptor(data)
        data[descriptor + 5:descriptor + 9] = struct.pack("<HH", width, height)
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", width, height)
    elif fmt == "JPEG":  # the baseline frame header: precision, then height and width
        frame = data.index(b"\xff\xc0")
        data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_image_descriptor(data: bytes) -> int:
    """Offset of the first image descriptor: after the header, the global colour table and any extensions."""
    position = 13 + (3 * 2 ** ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while data[position] == 0x21:  # extension: introducer, label, then sub-blocks up to a zero length
        position += 2
        while data[position]:
            position += data[position] + 1
        position += 1
    assert data[position] == 0x2C, "no image descriptor where the GIF format puts it"
    return position


def damage(draw, original: bytes, *, max_edits: int, garbage_size: int) -> bytes:
    """A hypothesis-drawn damaged copy of `original`: cut short, bits flipped, bytes inserted, or replaced by
    garbage."""
    from hypothesis import strategies as st

    data = bytearray(original)
    kind = draw(st.sampled_from(["cut", "flip", "insert", "garbage"]))
    if kind == "cut":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    if kind == "garbage":
        return draw(st.binary(max_size=garbage_size))
    for _ in range(draw(st.integers(1, max_edits))):
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)
