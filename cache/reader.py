"""Reading a cache: every way a file can be wrong becomes one CacheError line naming the file and the problem.

Stage 2 loads a whole cache into memory (a split is tens of MB); the token arrays of a cache larger than memory are
read a minibatch at a time through `TokenRows`. Reads go through `read_dataset` (or `TokenRows.rows`), which turn
HDF5's checksum failure into words a user can act on.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from fusion.cache.partial import FORMAT_VERSION, partial_dir
from fusion.errors import CacheError
from fusion.labels import LABELS, SPLITS

POOLED = ("text", "image", "label", "id")
TOKENS = ("text_tokens", "text_mask", "image_tokens")
SKIPPED = ("id", "split", "reason")


@dataclass
class SplitArrays:
    text: np.ndarray                  # (N, Dt) float16
    image: np.ndarray                 # (N, Di) float16
    label: np.ndarray                 # (N,) int64, 0..2
    id: np.ndarray                    # (N,) str
    text_tokens: np.ndarray | None = None   # (N, L, Dt) float16
    text_mask: np.ndarray | None = None     # (N, L) bool
    image_tokens: np.ndarray | None = None  # (N, P, Di) float16


@dataclass
class CacheData:
    path: Path
    attrs: dict
    splits: dict[str, SplitArrays]
    skipped: list[tuple[str, str, str]]  # (id, split, reason)


def read_cache(path: Path, *, tokens: bool = False) -> CacheData:
    """The whole cache in memory, validated; with tokens=True also the token arrays."""
    path = Path(path)
    with open_cache(path) as h5:
        attrs = check_header(h5, path)
        check_layout(h5, path, tokens=tokens)
        splits = {split: _read_split(h5, path, split, tokens) for split in SPLITS}
        skipped = _read_skipped(h5, path)
    return CacheData(path=path, attrs=attrs, splits=splits, skipped=skipped)


def is_complete_cache(path: Path, fingerprint: str) -> bool:
    """A finished cache of the current format made with exactly these settings (header and shapes only)."""
    try:
        with open_cache(Path(path)) as h5:
            attrs = check_header(h5, Path(path))
            check_layout(h5, Path(path), tokens=bool(attrs.get("tokens")))
    except CacheError:
        return False
    return attrs.get("fingerprint") == fingerprint


def json_attribute(attrs: dict, key: str, path: Path | str = "cache"):
    """An attribute written as JSON text (cache/writer.py h5_attr writes containers so), parsed; None when absent or
    empty (a cache written before it was recorded), or already parsed (a partial cache's plan.json)."""
    value = attrs.get(key)
    if value is None or value == "" or isinstance(value, (dict, list)):
        return value or None
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        raise CacheError(f"{path}: attribute {key!r} is not the JSON fusion writes; the cache is damaged") from None


def read_json_attribute(path: Path, key: str):
    """json_attribute of a complete cache file."""
    with open_cache(Path(path)) as h5:
        return json_attribute(check_header(h5, Path(path)), key, path)


def read_skipped(path: Path) -> list[tuple[str, str, str]]:
    path = Path(path)
    with open_cache(path) as h5:
        check_header(h5, path)
        return _read_skipped(h5, path)


class TokenRows:
    """The token arrays of a cache, left on disk and read a few rows at a time: training on a token cache larger than
    memory. Token datasets are stored one row per chunk (cache/writer.py), so any row costs one chunk read, in any
    order. The file stays open until close(); rows come back float16, as stored, and checked finite."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open_cache(self.path) as h5:  # every check of read_cache that needs no data
            check_header(h5, self.path)
            check_layout(h5, self.path, tokens=True)
            self.shapes = {split: {name: h5[split][name].shape for name in TOKENS} for split in SPLITS}
        self._h5: h5py.File | None = h5py.File(self.path, "r")

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> "TokenRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rows(self, split: str, index: np.ndarray | slice) -> dict[str, np.ndarray]:
        """TOKENS arrays of `split` at `index` (row numbers in any order, or a slice), in that order."""
        if self._h5 is None:
            raise CacheError(f"{self.path}: token reader is closed")
        rows = np.arange(*index.indices(self.shapes[split]["text_tokens"][0])) if isinstance(index, slice) else index
        arrays = {name: self._gather(split, name, rows) for name in TOKENS}
        for name in ("text_tokens", "image_tokens"):
            _check_finite(self.path, f"{split}/{name}", arrays[name], rows=rows)
        return arrays

    def _gather(self, split: str, name: str, rows: np.ndarray) -> np.ndarray:
        """Row by row into one buffer (h5py's list selection builds a point selection that is ~20x slower), so a
        damaged chunk is named by its row."""
        dataset = self._h5[split][name]
        out = np.empty((len(rows), *dataset.shape[1:]), dtype=dataset.dtype)
        for position, row in enumerate(np.asarray(rows).tolist()):
            try:
                dataset.read_direct(out, np.s_[row], np.s_[position])
            except (OSError, ValueError) as error:
                raise CacheError(f"{self.path}: cannot read {split}/{name} row {row}: {hdf5_reason(error)}") from error
        return out


@contextmanager
def open_cache(path: Path) -> Iterator[h5py.File]:
    if path.is_dir():
        what = ("the work folder of an interrupted run; resume `fusion extract` to finish the cache"
                if (path / "plan.json").exists() else "a folder, not a cache file")
        raise CacheError(f"{path}: is {what}")
    if not path.exists():
        hint = ("an interrupted run left its work in " + str(partial_dir(path)) + "; resume it with `fusion extract`"
                if partial_dir(path).is_dir() else "run `fusion extract` to make it")
        raise CacheError(f"{path}: no such cache file ({hint})")
    if not h5py.is_hdf5(path):
        raise CacheError(f"{path}: not an HDF5 file (not a fusion cache, or damaged at its start)")
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise CacheError(f"{path}: cannot open it ({hdf5_reason(error)}); the file is truncated or damaged, "
                         f"run `fusion extract` again") from error
    with h5:
        try:
            yield h5
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as error:
            # Damaged metadata surfaces from h5py as any of these (a failed metadata checksum, an offset out of
            # bounds, an undecodable attribute); our own checks raise CacheError, which passes through.
            reason = hdf5_reason(error)
            hint = "" if "fusion extract" in reason else "; run `fusion extract` again"
            raise CacheError(f"{path}: damaged cache file ({reason}){hint}") from error


def check_header(h5: h5py.File, path: Path) -> dict:
    attrs = {key: python_value(value) for key, value in h5.attrs.items()}
    if "format_version" not in attrs:
        raise CacheError(f"{path}: not a fusion cache (no format_version attribute)")
    if attrs["format_version"] != FORMAT_VERSION:
        raise CacheError(f"{path}: cache format version {attrs['format_version']}, but this fusion reads version "
                         f"{FORMAT_VERSION}; run `fusion extract` again with this version")
    if attrs.get("complete") is not True:
        raise CacheError(f"{path}: incomplete cache (the run writing it did not finish); resume `fusion extract` "
                         f"with the same arguments")
    return attrs


def check_layout(h5: h5py.File, path: Path, *, tokens: bool) -> None:
    """Groups, datasets and shapes, from metadata only (nothing large is read)."""
    if tokens and not python_value(h5.attrs.get("tokens", False)):
        raise CacheError(f"{path}: made without token arrays; run `fusion extract --tokens` to get them")
    dims = {}
    for split in SPLITS:
        require_datasets(h5, path, split, POOLED + (TOKENS if tokens else ()))
        for key, value in _split_dims(h5[split], path, split, tokens).items():
            if dims.setdefault(key, value) != value:
                raise CacheError(f"{path}: {split} has {key} {value} but {SPLITS[0]} has {dims[key]}")
    require_datasets(h5, path, "skipped", SKIPPED)


def require_datasets(h5: h5py.File, path: Path, group: str, names: tuple[str, ...]) -> None:
    if not isinstance(h5.get(group), h5py.Group):
        raise CacheError(f"{path}: missing group '{group}'")
    for name in names:
        if not isinstance(h5[group].get(name), h5py.Dataset):
            raise CacheError(f"{path}: missing dataset '{group}/{name}'")


def _split_dims(group: h5py.Group, path: Path, split: str, tokens: bool) -> dict[str, tuple]:
    """Checks a split's shapes against each other; returns the sizes that must agree between splits."""
    expected_ndim = {"text": 2, "image": 2, "label": 1, "id": 1, "text_tokens": 3, "text_mask": 2, "image_tokens": 3}
    names = POOLED + (TOKENS if tokens else ())
    for name in names:
        if group[name].ndim != expected_ndim[name]:
            raise CacheError(f"{path}: {split}/{name} has shape {group[name].shape}, expected "
                             f"{expected_ndim[name]} axes")
    rows = group["text"].shape[0]
    for name in names:
        if group[name].shape[0] != rows:
            raise CacheError(f"{path}: {split}/{name} has {group[name].shape[0]} rows but {split}/text has {rows}")
    dims = {"text dim": group["text"].shape[1], "image dim": group["image"].shape[1]}
    if tokens:
        if group["text_mask"].shape != group["text_tokens"].shape[:2]:
            raise CacheError(f"{path}: {split}/text_mask has shape {group['text_mask'].shape} but "
                             f"{split}/text_tokens has {group['text_tokens'].shape}")
        dims.update({"text token shape": group["text_tokens"].shape[1:],
                     "image token shape": group["image_tokens"].shape[1:]})
    return dims


def _read_split(h5: h5py.File, path: Path, split: str, tokens: bool) -> SplitArrays:
    arrays = {name: read_dataset(h5, path, f"{split}/{name}") for name in POOLED + (TOKENS if tokens else ())}
    arrays["id"] = decode_strings(arrays["id"])
    arrays["label"] = arrays["label"].astype(np.int64)
    outside = (arrays["label"] < 0) | (arrays["label"] >= len(LABELS))
    if outside.any():
        raise CacheError(f"{path}: {split}/label has {int(outside.sum())} value(s) outside 0..{len(LABELS) - 1} "
                         f"(first: {int(arrays['label'][outside][0])})")
    for name in ("text", "image", "text_tokens", "image_tokens"):
        if name in arrays:
            _check_finite(path, f"{split}/{name}", arrays[name])
    return SplitArrays(**arrays)


def _read_skipped(h5: h5py.File, path: Path) -> list[tuple[str, str, str]]:
    require_datasets(h5, path, "skipped", SKIPPED)
    columns = [decode_strings(read_dataset(h5, path, f"skipped/{name}")) for name in SKIPPED]
    if len({len(column) for column in columns}) != 1:
        raise CacheError(f"{path}: skipped/id, skipped/split and skipped/reason differ in length")
    return [tuple(str(value) for value in row) for row in zip(*columns)]


def read_dataset(h5: h5py.File, path: Path, name: str, selection=()) -> np.ndarray:
    try:
        return h5[name][selection]
    except OSError as error:
        raise CacheError(f"{path}: cannot read {name}: {hdf5_reason(error)}") from error


def hdf5_reason(error: Exception) -> str:
    """An h5py error in words a user can act on (its first line; a failed checksum named as such)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # fletcher32 is the only filter a cache uses, so a failing filter means the stored checksum does not match.
    if "filter returned failure" in text or "Fletcher32" in text:
        return "checksum mismatch (damaged file); run `fusion extract` again"
    if "metadata checksum" in text:
        return "metadata checksum mismatch"
    return text


def _check_finite(path: Path, name: str, values: np.ndarray, *, rows: np.ndarray | None = None) -> None:
    """rows: the file's row number of each value row (default 0, 1, ...), for the message."""
    if not len(values) or not _any_non_finite(values):
        return
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise CacheError(f"{path}: {name} has NaN or Inf in {int(bad.sum())} row(s) (first: row "
                         f"{first if rows is None else int(rows[first])})")


def _any_non_finite(values: np.ndarray) -> bool:
    """float16 is Inf or NaN exactly when its 5 exponent bits are all set: an integer test, ~4x faster than
    np.isfinite, which numpy does not vectorise for float16 (streamed training checks every minibatch)."""
    if values.dtype == np.float16:
        exponent = np.uint16(0x7C00)
        return bool(((values.view(np.uint16) & exponent) == exponent).any())
    return not np.isfinite(values).all()


def decode_strings(values: np.ndarray) -> np.ndarray:
    """Fixed-width UTF-8 bytes (as written) -> numpy str array."""
    if values.dtype.kind == "S":
        return np.array([value.decode("utf-8") for value in values], dtype=str).reshape(-1)
    return values.astype(str)


def python_value(value):
    """h5py attribute values -> plain Python (JSON-serialisable)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
