"""Partial folder(s) -> the final HDF5 cache, by an atomic rename.

Batches are streamed one file at a time. Token arrays go straight to disk in one-row chunks (the batches are formed by
text length, so their rows are scattered over the file; a chunk per row means each chunk is written exactly once).
The pooled arrays of a split are small (tens of MB) and are gathered in memory, then written in ~1 MiB chunks.
Every dataset carries a fletcher32 checksum, so a flipped byte is reported on read instead of becoming a wrong number.
The file is written in the HDF5 1.10 format, whose metadata (object headers, chunk indexes, superblock) carries
checksums too, and string attributes are fixed-width: a flip anywhere is an error, never a silently changed value.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fusion.cache.partial import (FORMAT_VERSION, POOLED_ARRAYS, TOKEN_ARRAYS, BatchRef, PartialState, json_default,
                                  partial_dir, scan_partial, acquire_lock)
from fusion.atomic import fsync_directory
from fusion.errors import CacheError
from fusion.labels import LABELS, SPLITS

CHUNK_BYTES = 1 << 20
UTF8 = "utf-8"
# The 1.10 file format checksums all metadata; the default (earliest) format does not, and a flipped byte in an
# unchecked object header or chunk index can silently swap values or send HDF5 into an endless loop.
LIBVER = "v110"


@dataclass
class Layout:
    """Where every embedded row lands: split number and position inside that split, in plan order."""
    split_of: np.ndarray      # (rows,) int8 index into SPLITS
    position: np.ndarray      # (rows,) int64 row within its split; -1 for skipped rows
    counts: dict[str, int]
    skipped_rows: np.ndarray  # plan order
    reasons: dict[int, str]


@dataclass
class Dims:
    text: int
    image: int
    tokens: bool
    text_length: int = 0
    patches: int = 0
    text_token_dim: int = 0
    image_token_dim: int = 0


def finalize(partial_dirs: list[Path], out: Path) -> Path:
    """Merges the batches of every partial folder in plan order into `out`; removes the folders afterwards."""
    out = Path(out)
    directories = list(dict.fromkeys(Path(d) for d in partial_dirs))
    with ExitStack() as locks:
        for directory in directories:
            for lock_file in sorted(directory.glob("rank*.lock")):
                locks.callback(acquire_lock(lock_file, out).release)  # a rank still writing must finish first
        states = [scan_partial(directory) for directory in directories]
        plan = _common_plan(states)
        batches = [batch for state in states for batch in state.batches]
        layout = make_layout(states[0], batches)
        dims = _dims(batches, plan.attrs, states[0].directory)
        temp = out.with_name(out.name + ".tmp")
        try:
            write_h5(temp, states[0], layout, dims, batches)
            os.replace(temp, out)
        except BaseException:
            temp.unlink(missing_ok=True)  # a half-written file must not outlive the failure
            raise
        fsync_directory(out.parent)
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)
    return out


def remove_leftover_partial(out: Path) -> None:
    """A run killed between the final rename and the removal of its work folder leaves the folder beside the
    finished cache; nothing in it is needed any more."""
    shutil.rmtree(partial_dir(Path(out)), ignore_errors=True)


def _common_plan(states: list[PartialState]):
    plan = states[0].plan
    for state in states:
        if state.damaged:
            raise CacheError(f"{state.damaged[0]}: damaged batch file; delete it and run `fusion extract` again "
                             f"to recompute its rows")
        if state.plan.fingerprint != plan.fingerprint or state.plan.ids != plan.ids:
            raise CacheError(f"{state.directory} and {states[0].directory} were made for different settings; "
                             f"they cannot be merged")
    return plan


def make_layout(state: PartialState, batches: list[BatchRef]) -> Layout:
    """Checks that every plan row is done exactly once and assigns each embedded row its place."""
    plan, rows = state.plan, len(state.plan.ids)
    owner = np.full(rows, -1, dtype=np.int64)
    reasons: dict[int, str] = {}
    for number, batch in enumerate(batches):
        claimed = np.concatenate([batch.index, batch.skipped_index])
        twice = claimed[owner[claimed] >= 0]
        if len(twice):
            raise CacheError(f"{batch.path}: row {int(twice[0])} (id {plan.ids[int(twice[0])]!r}) is also in "
                             f"{batches[owner[twice[0]]].path.name}; delete one of them and run `fusion extract`")
        owner[claimed] = number
        reasons.update(zip(batch.skipped_index.tolist(), batch.skipped_reason.tolist()))
    _check_all_done(state, owner)
    skipped = np.zeros(rows, dtype=bool)
    skipped[list(reasons)] = True
    return _positions(state, skipped, reasons)


def _check_all_done(state: PartialState, owner: np.ndarray) -> None:
    missing = np.flatnonzero(owner < 0)
    if len(missing):
        first = int(missing[0])
        raise CacheError(f"{state.directory}: {len(missing)} of {len(owner)} rows are not computed yet (first: id "
                         f"{state.plan.ids[first]!r} in {state.plan.splits[first]}); run `fusion extract` again "
                         f"to finish them")


def _positions(state: PartialState, skipped: np.ndarray, reasons: dict[int, str]) -> Layout:
    plan = state.plan
    split_of = np.array([SPLITS.index(split) for split in plan.splits], dtype=np.int8)
    labels = np.asarray(plan.labels, dtype=np.int64)
    bad = np.flatnonzero(~skipped & ((labels < 0) | (labels >= len(LABELS))))
    if len(bad):
        raise CacheError(f"{state.directory}: row {int(bad[0])} (id {plan.ids[int(bad[0])]!r}) has label "
                         f"{int(labels[bad[0]])} but was embedded; labels must be 0..{len(LABELS) - 1}")
    position = np.full(len(split_of), -1, dtype=np.int64)
    counts = {}
    for number, split in enumerate(SPLITS):
        rows = np.flatnonzero((split_of == number) & ~skipped)
        position[rows] = np.arange(len(rows))
        counts[split] = len(rows)
    return Layout(split_of=split_of, position=position, counts=counts,
                  skipped_rows=np.flatnonzero(skipped), reasons=reasons)


def _dims(batches: list[BatchRef], attrs: dict, directory: Path) -> Dims:
    """Array sizes from the batch headers; they must agree, and text tokens pad to the longest text overall."""
    shapes = [batch.shapes for batch in batches if len(batch.index)]
    if not shapes:  # every row skipped: keep the model's dims if the plan knows them
        return Dims(text=int(attrs.get("text_dim", 0)), image=int(attrs.get("image_dim", 0)),
                    tokens=bool(attrs.get("tokens", False)))
    with_tokens = {all(name in shape for name in TOKEN_ARRAYS) for shape in shapes}
    fixed = {(s["text"][1:], s["image"][1:]) + ((s["text_tokens"][2:], s["image_tokens"][1:]) if "text_tokens" in s
                                               else ()) for s in shapes}
    if len(with_tokens) != 1 or len(fixed) != 1:
        raise CacheError(f"{directory}: batch files disagree on array sizes or on tokens; "
                         f"delete the folder and run `fusion extract` again")
    first = shapes[0]
    dims = Dims(text=first["text"][1], image=first["image"][1], tokens=with_tokens.pop())
    if dims.tokens:
        dims.text_length = max(s["text_tokens"][1] for s in shapes)
        dims.text_token_dim = first["text_tokens"][2]
        dims.patches, dims.image_token_dim = first["image_tokens"][1:]
    return dims


def write_h5(temp: Path, state: PartialState, layout: Layout, dims: Dims, batches: list[BatchRef]) -> None:
    """Everything but `complete` first; `complete` last, then flush and fsync before the caller renames."""
    with h5py.File(temp, "w", libver=LIBVER) as h5:
        write_attrs(h5, state.plan.attrs, fingerprint=state.plan.fingerprint, tokens=dims.tokens)
        token_sets = _create_token_datasets(h5, layout, dims)
        pooled = {split: _pooled_buffers(rows, dims) for split, rows in layout.counts.items()}
        for batch in batches:
            _copy_batch(batch, layout, pooled, token_sets)
        _write_pooled(h5, state, layout, pooled)
        _write_skipped(h5, state, layout)
        h5.attrs["complete"] = True
        h5.flush()
    with temp.open("rb") as handle:
        os.fsync(handle.fileno())


def _pooled_buffers(rows: int, dims: Dims) -> dict[str, np.ndarray]:
    """The small per-row arrays, gathered in memory and written once in row order (scattered writes into
    multi-row chunks would rewrite each chunk many times)."""
    buffers = {"text": np.zeros((rows, dims.text), np.float16), "image": np.zeros((rows, dims.image), np.float16)}
    if dims.tokens:
        buffers["text_mask"] = np.zeros((rows, dims.text_length), bool)
    return buffers


def write_attrs(h5: h5py.File, attrs: dict, *, fingerprint: str, tokens: bool) -> None:
    merged = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **attrs,
              "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "tokens": tokens, "complete": False}
    for key, value in merged.items():
        value = h5_attr(value)
        if isinstance(value, str):
            # Fixed width: a variable-length string lives in the global heap, outside every checksum.
            encoded = value.encode(UTF8)
            h5.attrs.create(key, np.array(encoded, dtype=f"S{max(1, len(encoded))}"),
                            dtype=h5py.string_dtype(UTF8, max(1, len(encoded))))
        else:
            h5.attrs[key] = value


def h5_attr(value):
    """HDF5 attributes hold scalars and strings: None becomes "", containers become JSON text."""
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=json_default)
    if isinstance(value, Path):
        return str(value)
    return value


def _create_token_datasets(h5: h5py.File, layout: Layout, dims: Dims) -> dict[str, dict[str, h5py.Dataset]]:
    if not dims.tokens:
        return {}
    shapes = {"text_tokens": (dims.text_length, dims.text_token_dim),
              "image_tokens": (dims.patches, dims.image_token_dim)}
    return {split: {name: _create(h5.require_group(split), name, (rows, *shape), np.float16, chunk_rows=1)
                    for name, shape in shapes.items()}
            for split, rows in layout.counts.items()}


def _create(group: h5py.Group, name: str, shape: tuple, dtype, *, chunk_rows: int | None = None,
            data: np.ndarray | None = None) -> h5py.Dataset:
    """Chunked with a checksum; an empty dataset has no chunk to checksum and is stored contiguous."""
    if shape[0] == 0:
        return group.create_dataset(name, shape=shape, dtype=dtype, data=data)
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize)
    rows = chunk_rows or max(1, min(shape[0], CHUNK_BYTES // row_bytes))
    return group.create_dataset(name, shape=shape, dtype=dtype, data=data, chunks=(rows, *shape[1:]),
                                fletcher32=True, fillvalue=np.zeros((), dtype=dtype) if data is None else None)


def _copy_batch(batch: BatchRef, layout: Layout, pooled: dict, token_sets: dict) -> None:
    if not len(batch.index):
        return
    try:
        with np.load(batch.path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in (*POOLED_ARRAYS, *TOKEN_ARRAYS) if name in npz.files}
    except Exception as error:  # the zip's CRC catches damage in the embeddings that the header scan did not read
        raise CacheError(f"{batch.path}: damaged batch file ({error}); delete it and run `fusion extract` again "
                         f"to recompute its rows") from error
    for number, split in enumerate(SPLITS):
        mine = np.flatnonzero(layout.split_of[batch.index] == number)
        if not len(mine):
            continue
        positions = layout.position[batch.index[mine]]
        for name in POOLED_ARRAYS:
            pooled[split][name][positions] = arrays[name][mine]
        if token_sets:
            pooled[split]["text_mask"][positions, :arrays["text_mask"].shape[1]] = arrays["text_mask"][mine]
            _write_tokens(token_sets[split], arrays, mine, positions)


def _write_tokens(datasets: dict[str, h5py.Dataset], arrays: dict, rows: np.ndarray, positions: np.ndarray) -> None:
    """Row by row: each row is one whole chunk, which HDF5 writes without reading (a list selection is ~20x slower)."""
    text_tokens = datasets["text_tokens"]
    padded = np.zeros(text_tokens.shape[1:], np.float16)
    for row, position in zip(rows.tolist(), positions.tolist()):
        tokens = arrays["text_tokens"][row]
        padded[:len(tokens)] = tokens
        padded[len(tokens):] = 0
        text_tokens[position] = padded
        datasets["image_tokens"][position] = arrays["image_tokens"][row]


def _write_pooled(h5: h5py.File, state: PartialState, layout: Layout, pooled: dict) -> None:
    labels = np.asarray(state.plan.labels, dtype=np.int64)
    for number, split in enumerate(SPLITS):
        group = h5.require_group(split)
        rows = np.flatnonzero((layout.split_of == number) & (layout.position >= 0))
        for name, values in pooled[split].items():
            _create(group, name, values.shape, values.dtype, data=values)
        _create(group, "label", (len(rows),), np.int64, data=labels[rows])
        write_strings(group, "id", [state.plan.ids[row] for row in rows])


def _write_skipped(h5: h5py.File, state: PartialState, layout: Layout) -> None:
    group = h5.require_group("skipped")
    rows = layout.skipped_rows.tolist()
    write_strings(group, "id", [state.plan.ids[row] for row in rows])
    write_strings(group, "split", [state.plan.splits[row] for row in rows])
    write_strings(group, "reason", [layout.reasons[row] for row in rows])


def write_strings(group: h5py.Group, name: str, values: list[str]) -> h5py.Dataset:
    """Fixed-width UTF-8: variable-length strings live outside the chunks, where no checksum can cover them."""
    encoded = np.array([value.encode(UTF8) for value in values], dtype=bytes).reshape(-1)
    width = max(1, encoded.dtype.itemsize)
    data = encoded.astype(h5py.string_dtype(UTF8, length=width))
    return _create(group, name, data.shape, data.dtype, data=data)
