"""How the application reports progress without printing: a caller (the CLI's progress bars) passes
progress(description, unit), a context manager factory yielding update(done, total); None shows nothing."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import ContextManager

Update = Callable[[int, int], None]
Progress = Callable[[str, str], ContextManager[Update]]


def progress_of(progress: Progress | None, description: str, unit: str) -> ContextManager[Update | None]:
    return progress(description, unit) if progress else nullcontext(None)
