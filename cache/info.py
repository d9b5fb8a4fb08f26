"""`fusion cache info`: what a cache (or the partial folder of an interrupted run) holds, as a JSON-ready dict."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from fusion.cache.partial import PartialState, partial_dir, scan_partial
from fusion.cache.partial import FORMAT_VERSION
from fusion.cache.reader import (SKIPPED, check_layout, decode_strings, hdf5_reason, json_attribute, open_cache,
                                 python_value, read_dataset, require_datasets)
from fusion.errors import CacheError
from fusion.labels import LABELS, SPLITS

SUMMARY_ATTRS = ("dataset", "text_model", "image_model", "fingerprint", "format_version", "created", "tokens",
                 "precision", "device_type", "text_pooling", "image_pooling", "columns", "split_kind", "split_source")


def cache_info(path: Path) -> dict:
    """Dataset, models, dims, per-split counts by class, skipped rows by reason, fingerprint, completeness."""
    path = Path(path)
    if path.is_dir():
        return partial_info(path)
    if not path.exists() and partial_dir(path).is_dir():
        return partial_info(partial_dir(path))
    return file_info(path)


def file_info(path: Path) -> dict:
    with open_cache(path) as h5:
        attrs = {key: python_value(value) for key, value in h5.attrs.items()}
        if attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{path}: cache format version {attrs.get('format_version')}, but this fusion reads "
                             f"version {FORMAT_VERSION}")
        complete = attrs.get("complete") is True
        if complete:  # an incomplete file may lack parts; report what is there instead of refusing
            check_layout(h5, path, tokens=bool(attrs.get("tokens")))
        splits = {split: _split_summary(read_dataset(h5, path, f"{split}/label")) for split in SPLITS if split in h5}
        dims = {name: int(h5[split][name].shape[1]) for split in SPLITS if split in h5 for name in ("text", "image")
                if name in h5[split]}
        reasons = []
        if "skipped" in h5:
            require_datasets(h5, path, "skipped", SKIPPED)
            reasons = decode_strings(read_dataset(h5, path, "skipped/reason")).tolist()
    done = sum(split["count"] for split in splits.values()) + len(reasons)
    return _summary(path, attrs, dims, splits, reasons, complete=complete, rows_done=done,
                    rows_total=done if complete else None)


def verify_cache(path: Path, block_bytes: int = 64 << 20) -> dict:
    """Reads every stored byte, so HDF5 checks every chunk's fletcher32 checksum (info alone reads metadata and
    labels). Goes on past a damaged dataset: {"datasets": n, "bytes": read, "damaged": {name: reason}}."""
    path = Path(path)
    datasets, damaged, read = 0, {}, 0
    with open_cache(path) as h5:
        names: list[str] = []
        h5.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        for name in names:
            dataset = h5[name]
            datasets += 1
            rows = max(1, block_bytes // max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))))
            try:
                for start in range(0, dataset.shape[0] if dataset.ndim else 1, rows):
                    read += dataset[np.s_[start:start + rows] if dataset.ndim else ()].nbytes
            except OSError as error:
                damaged[name] = hdf5_reason(error)
    return {"datasets": datasets, "bytes": read, "damaged": damaged}


def partial_info(directory: Path) -> dict:
    """An interrupted run: rows done of the plan's total, counted from the batch files' indices."""
    state = scan_partial(directory)
    plan = state.plan
    labels, split_names = np.asarray(plan.labels, dtype=np.int64), np.asarray(plan.splits)
    embedded = np.concatenate([batch.index for batch in state.batches] or [np.zeros(0, np.int64)])
    reasons = [reason for batch in state.batches for reason in batch.skipped_reason.tolist()]
    splits = {split: _split_summary(labels[embedded[split_names[embedded] == split]]) for split in SPLITS}
    info = _summary(directory, {**plan.attrs, "fingerprint": plan.fingerprint}, _partial_dims(state), splits,
                    reasons, complete=False, rows_done=len(embedded) + len(reasons), rows_total=len(plan.ids))
    info["damaged_batch_files"] = len(state.damaged)
    return info


def _partial_dims(state: PartialState) -> dict[str, int]:
    for batch in state.batches:
        if len(batch.index):
            return {"text": int(batch.shapes["text"][1]), "image": int(batch.shapes["image"][1])}
    attrs = state.plan.attrs
    return {name: int(attrs[f"{name}_dim"]) for name in ("text", "image") if f"{name}_dim" in attrs}


def _split_summary(labels: np.ndarray) -> dict:
    labels = np.asarray(labels, dtype=np.int64)
    per_class = {name: int((labels == number).sum()) for number, name in enumerate(LABELS)}
    summary = {"count": int(len(labels)), "per_class": per_class}
    outside = int(len(labels) - sum(per_class.values()))
    if outside:
        summary["invalid_labels"] = outside
    return summary


def _summary(path: Path, attrs: dict, dims: dict, splits: dict, reasons: list[str], *, complete: bool,
             rows_done: int, rows_total: int | None) -> dict:
    info = {"path": str(path), **{key: attrs.get(key) for key in SUMMARY_ATTRS}}
    info["duplicates"] = json_attribute(attrs, "duplicates", path)  # posts shared across splits, extract/duplicates.py
    info.update(dims=dims, splits=splits, complete=complete, rows_done=rows_done, rows_total=rows_total,
                skipped={"count": len(reasons), "reasons": dict(Counter(reasons).most_common())})
    return info
