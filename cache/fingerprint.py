"""The cache key: a hash of everything that changes a cache's content.

A cache is reused only when its fingerprint equals the one computed for the requested run, so the settings passed here
must name every input of the embeddings (models and revisions, pooling, preprocessing, max length, split seed, ...).
That includes how the numbers are computed: the precision together with the device type (bf16 is autocast on a CPU
and a whole-model cast on a GPU), and the image preprocessing path (uint8 crops normalised on the device, or the image
processor's own float path), so a cache is never resumed or reused with rows computed another way.
The dataset's label files are hashed by content, not by path: moving the dataset folder keeps its caches valid, while
editing a label changes the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fusion.version import __version__
from fusion.errors import CacheError

_READ_BYTES = 1 << 20


def fingerprint(settings: dict, source_files: list[Path]) -> str:
    """sha256 hex of the canonical settings JSON, each source file's bytes (in order) and the fusion version."""
    digest = hashlib.sha256()
    _update_framed(digest, b"fusion-cache-fingerprint/1")
    _update_framed(digest, __version__.encode())
    _update_framed(digest, canonical_json(settings).encode())
    for path in source_files:
        _hash_file(digest, Path(path))
    return digest.hexdigest()


def canonical_json(settings: dict) -> str:
    """Sorted keys and fixed separators, so equal settings always give the same bytes."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=json_default)


def json_default(value: Any) -> Any:
    """Paths and numpy scalars appear in settings; anything else unknown is a bug in the caller."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    raise TypeError(f"cannot put {type(value).__name__} {value!r} into a cache fingerprint")


def _update_framed(digest, data: bytes) -> None:
    # The length prefix keeps field boundaries unambiguous ("ab"+"c" and "a"+"bc" hash differently).
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def _hash_file(digest, path: Path) -> None:
    """Streams the file (label files can be large) and frames it by its size."""
    try:
        size = path.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with path.open("rb") as handle:
            while block := handle.read(_READ_BYTES):
                digest.update(block)
    except OSError as error:
        raise CacheError(f"{path}: cannot read it to fingerprint the cache ({error.strerror or error})") from error
