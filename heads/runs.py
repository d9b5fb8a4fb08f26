"""Glue between a cache file and stage 2: features in memory (or token sequences streamed from disk), the cache's
identity recorded with every result."""

from __future__ import annotations

import math
from pathlib import Path

from fusion.cache.reader import CacheData, TokenRows, json_attribute, read_cache
from fusion.memory import available_memory
from fusion.heads.features import features_from_cache
from fusion.heads.streamed import StreamedSplit

CACHE_KEYS = ("dataset", "text_model", "image_model", "text_model_revision", "image_model_revision", "max_length",
              "image_size", "precision", "split_seed", "tokens", "text_dim", "image_dim", "split_source", "split_kind",
              "split_file", "split_file_sha256", "text_pooling", "image_pooling")  # predict pools as the cache did
# Token sequences are loaded when their float32 copy takes at most this share of the memory available now; the rest
# is left for the models' activations, Adam's state and everything else on the machine.
LOAD_SHARE = 0.5


def cache_meta(data: CacheData) -> dict:
    """What a result needs to say about its cache: the file, its fingerprint, and how it was made."""
    meta = {key: data.attrs.get(key) for key in CACHE_KEYS if key in data.attrs}
    if "duplicates" in data.attrs:  # posts shared across splits, as the reports show them (extract/duplicates.py)
        meta["duplicates"] = json_attribute(data.attrs, "duplicates", data.path)
    meta.update(path=str(Path(data.path).resolve()), fingerprint=data.attrs["fingerprint"])
    return meta


def load_features(path: Path, *, tokens: bool = False, stream: bool = False):
    """Features by split and the cache's meta. Pooled features are read whole into float32 tensors; with tokens,
    the sequences too, unless `stream`: then they stay on disk and each minibatch reads its rows."""
    path = Path(path)
    if not (tokens and stream):
        data = read_cache(path, tokens=tokens)
        return features_from_cache(data, tokens=tokens), cache_meta(data)
    reader = TokenRows(path)  # closed with the file object when the splits are dropped
    data = read_cache(path)
    pooled = features_from_cache(data)
    return {name: StreamedSplit(reader, name, split) for name, split in pooled.items()}, cache_meta(data)


def should_stream(path: Path) -> tuple[bool, int, int]:
    """(stream?, bytes loading the token sequences takes at its peak, bytes of memory available now). The peak holds
    the float16 arrays as read and their float32 tensors, 2 + 4 bytes a value (benchmarks/token_stream.py)."""
    with TokenRows(Path(path)) as reader:
        needed = sum((2 + 4) * math.prod(shape) for split in reader.shapes.values()
                     for name, shape in split.items() if name != "text_mask")
    available = available_memory()
    return needed > LOAD_SHARE * available, needed, available
