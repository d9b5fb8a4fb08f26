"""Glue between a cache file and stage 2: features in memory, the cache's identity recorded with every result."""

from __future__ import annotations

from pathlib import Path

from fusion.cache.reader import CacheData, read_cache
from fusion.heads.features import features_from_cache

# The metric each dataset is reported with in the literature (shared/DATASETS.md).
DATASET_METRICS = {"memotion": "macro_f1", "mvsa-single": "weighted_f1", "mvsa-multi": "weighted_f1"}
CACHE_KEYS = ("dataset", "text_model", "image_model", "text_model_revision", "image_model_revision", "max_length",
              "image_size", "precision", "split_seed", "tokens", "text_dim", "image_dim")


def default_metric(dataset: str) -> str:
    return DATASET_METRICS.get(dataset, "macro_f1")


def cache_meta(data: CacheData) -> dict:
    """What a result needs to say about its cache: the file, its fingerprint, and how it was made."""
    meta = {key: data.attrs.get(key) for key in CACHE_KEYS if key in data.attrs}
    meta.update(path=str(Path(data.path).resolve()), fingerprint=data.attrs["fingerprint"])
    return meta


def load_features(path: Path, *, tokens: bool = False):
    """The whole cache read once into float32 tensors; returns (features by split, cache meta)."""
    data = read_cache(Path(path), tokens=tokens)
    return features_from_cache(data, tokens=tokens), cache_meta(data)
