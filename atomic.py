"""Atomic file writes: a temp file in the same folder, fsync, rename. Readers see the old file or the whole new one,
never a part, even when the writer is killed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(target: Path, write: Callable[[BinaryIO], object], *, temp_prefix: str = ".tmp-",
                 durable: bool = True) -> None:
    """durable=False skips the fsyncs, for files that can be made again (atomic still: never a torn file)."""
    target = Path(target)
    temp = target.with_name(f"{temp_prefix}{os.getpid()}-{target.name}")
    try:
        with temp.open("wb") as handle:
            write(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(target.parent)


def write_bytes_atomic(target: Path, data: bytes, *, temp_prefix: str = ".tmp-", durable: bool = True) -> None:
    write_atomic(target, lambda handle: handle.write(data), temp_prefix=temp_prefix, durable=durable)


def write_text_atomic(target: Path, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def fsync_directory(directory: Path) -> None:
    """Makes a rename durable; some filesystems refuse to open a folder, where there is nothing more to do."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
