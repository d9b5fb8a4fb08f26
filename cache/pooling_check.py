"""Refuse, in words, to resume or reuse a cache made with another pooling.

The fingerprint already refuses it (pooling is hashed in), but its message can only say "other settings"; pooling is
a choice a user makes per run (--text-pooling, --image-pooling), so a mismatch is named: which one, and both values.
"""

from __future__ import annotations

from pathlib import Path

from fusion.cache.partial import partial_dir, read_plan
from fusion.cache.reader import check_header, open_cache
from fusion.errors import CacheError

POOLING_ATTRS = ("text_pooling", "image_pooling")


def refuse_other_pooling(out: Path, attrs: dict) -> None:
    """CacheError when `out` (finished) or its partial folder was made with a pooling other than `attrs` asks for;
    a file that cannot be read is left to the fingerprint checks, which say what is wrong with it."""
    out = Path(out)
    for where, stored in ((out, _cache_attrs(out)), (partial_dir(out), _partial_attrs(out))):
        for key in POOLING_ATTRS:
            if key in stored and key in attrs and str(stored[key]) != str(attrs[key]):
                raise CacheError(f"{where} was made with {key} {stored[key]!r}, this run asks for {attrs[key]!r}; "
                                 f"delete it, choose another --out, or pass the pooling it was made with")


def _cache_attrs(out: Path) -> dict:
    if not out.is_file():
        return {}
    try:
        with open_cache(out) as h5:
            return check_header(h5, out)
    except CacheError:
        return {}


def _partial_attrs(out: Path) -> dict:
    if not partial_dir(out).is_dir():
        return {}
    try:
        return dict(read_plan(partial_dir(out)).attrs)
    except CacheError:
        return {}
