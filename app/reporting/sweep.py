"""Encoder sweeps: the same grid on several caches of one dataset, made with different encoders, and the differences
between them on the same test rows.

    fusion grid --cache caches/mvsa-single.h5 --cache caches/mvsa-single-clip.h5 --out runs/mvsa-single-sweep

Each cache gets an ordinary grid directory (`OUT/NAME/`, resumable, `fusion report` works on it). Then, per cache,
the configuration chosen on validation (overall, and per head) is scored on the test rows with a 95% bootstrap
interval, and every other cache is compared with the one whose chosen configuration is best on validation, by a
paired hierarchical bootstrap of the difference (seeds, then the same test rows; app/reporting/stats.py), with Holm's
correction across all the differences of the sweep's table. The test predictions come from the grid's rows
(`test_pred`, heads/search/grid.py). Caches of different datasets, or
whose test rows differ (other ids, other labels), are refused before any training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion.app.reporting.stats import (BOOTSTRAP_SEED, HOLM, LEVEL, METHOD, RESAMPLES, judge, metric_ci,
                                        paired_difference)
from fusion.cache.reader import check_header, decode_strings, open_cache, read_dataset
from fusion.errors import FusionError
from fusion.heads.search.summary import Summary, best_per_head, summarise
from fusion.heads.result import decode_labels

SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepCache:
    """One cache of a sweep: where it is, what made it, and its test rows."""
    path: Path
    name: str  # its grid directory under the sweep's --out
    attrs: dict
    test_ids: list[str]
    test_labels: np.ndarray

    @property
    def encoders(self) -> str:
        """The encoder pair as a table shows it: short model names, with their pooling."""
        return f"{_short(self.attrs.get('text_model'))} ({self.attrs.get('text_pooling', 'cls')}) + " \
               f"{_short(self.attrs.get('image_model'))} ({self.attrs.get('image_pooling', 'cls_layernorm')})"


def _short(model) -> str:
    return Path(str(model)).name or str(model)


def sweep_caches(paths: list[Path]) -> list[SweepCache]:
    """The caches, checked to be comparable: one dataset, the same test rows (ids and labels); one line otherwise."""
    caches, names = [], set()
    for path in paths:
        attrs, ids, labels = _test_rows(Path(path))
        name = Path(path).stem if Path(path).stem not in names else f"{Path(path).stem}-{len(names)}"
        names.add(name)
        caches.append(SweepCache(Path(path), name, attrs, ids, labels))
    first = caches[0]
    for other in caches[1:]:
        _check_comparable(first, other)
    return caches


def _test_rows(path: Path) -> tuple[dict, list[str], np.ndarray]:
    """The cache's attributes and its test split's ids and labels, read without loading any embedding."""
    with open_cache(path) as h5:
        attrs = check_header(h5, path)
        if "test" not in h5:
            raise FusionError(f"{path}: has no test split; a sweep compares caches on their test rows")
        ids = [str(value) for value in decode_strings(read_dataset(h5, path, "test/id"))]
        labels = np.asarray(read_dataset(h5, path, "test/label"), dtype=np.int64)
    return attrs, ids, labels


def _check_comparable(first: SweepCache, other: SweepCache) -> None:
    if first.attrs.get("dataset") != other.attrs.get("dataset"):
        raise FusionError(f"--cache {other.path} holds dataset {other.attrs.get('dataset')!r} but {first.path} holds "
                          f"{first.attrs.get('dataset')!r}: a sweep compares encoders on one dataset")
    if set(first.test_ids) != set(other.test_ids) or len(first.test_ids) != len(other.test_ids):
        unshared = len(set(first.test_ids) ^ set(other.test_ids))
        raise FusionError(f"--cache {other.path}: its test rows differ from those of {first.path} ({unshared} ids not "
                          f"shared); extract both with the same dataset files and --seed")
    labels = dict(zip(first.test_ids, first.test_labels.tolist()))
    differing = [i for i, label in zip(other.test_ids, other.test_labels.tolist()) if labels[i] != label]
    if differing:
        raise FusionError(f"--cache {other.path}: test row {differing[0]!r} has another label than in {first.path} "
                          f"({len(differing)} rows differ); the caches were made from different label files")


def seed_predictions(rows: list[dict], summary: Summary, cache: SweepCache, order: list[str]) -> np.ndarray:
    """(seeds, test rows) predictions of a summary's configuration, its rows put in `order` (the first cache's)."""
    wanted = json.dumps(summary.config, sort_keys=True)
    by_seed = {row["config"]["seed"]: row for row in rows
               if json.dumps({k: v for k, v in row["config"].items() if k != "seed"}, sort_keys=True) == wanted}
    if any(not by_seed[seed].get("test_pred") for seed in summary.seeds):
        raise FusionError(f"{cache.path}: its grid rows hold no test predictions (rows written by an older fusion); "
                          f"run the sweep into a new --out")
    position = {sid: i for i, sid in enumerate(cache.test_ids)}
    reorder = np.array([position[sid] for sid in order])
    return np.stack([decode_labels(by_seed[seed]["test_pred"])[reorder] for seed in summary.seeds])


def compare(caches: list[SweepCache], rows: dict[str, list[dict]], metric: str, *,
            resamples: int = RESAMPLES) -> dict:
    """The sweep's document (sweep.json): per cache its best configuration and best per head with test intervals,
    and each other cache's difference from the leader (best on validation), overall and per head."""
    order, y_true = caches[0].test_ids, caches[0].test_labels
    entries, predictions = [], {}
    for cache in caches:
        summaries = summarise(rows[cache.name], metric)
        chosen = {"best": summaries[0], **best_per_head(summaries)}
        predictions[cache.name] = {key: seed_predictions(rows[cache.name], summary, cache, order)
                                   for key, summary in chosen.items()}
        entries.append({"name": cache.name, "path": str(cache.path), "encoders": cache.encoders,
                        **{key: cache.attrs.get(key) for key in ("text_model", "image_model", "text_pooling",
                                                                 "image_pooling", "fingerprint")},
                        "chosen": {key: _scored(summary, y_true, predictions[cache.name][key], metric, resamples)
                                   for key, summary in chosen.items()}})
    leader = max(entries, key=lambda entry: entry["chosen"]["best"]["val_mean"])
    pairs = [(entry, key) for entry in entries if entry is not leader for key in entry["chosen"]
             if key in leader["chosen"]]
    intervals = [paired_difference(y_true, predictions[leader["name"]][key], predictions[entry["name"]][key], metric,
                                   resamples=resamples, seed=BOOTSTRAP_SEED, level=LEVEL) for entry, key in pairs]
    differences = [{"a": leader["name"], "b": entry["name"], "what": key, **judged}
                   for (entry, key), judged in zip(pairs, judge(intervals, LEVEL))]
    return {"metric": metric, "level": LEVEL, "resamples": resamples, "bootstrap_seed": BOOTSTRAP_SEED,
            "method": METHOD, "correction": HOLM, "dataset": caches[0].attrs.get("dataset"), "test_rows": len(order),
            "leader": leader["name"], "caches": entries, "differences": differences}


def _scored(summary: Summary, y_true: np.ndarray, predictions: np.ndarray, metric: str, resamples: int) -> dict:
    interval = metric_ci(y_true, predictions, metric, resamples=resamples, seed=BOOTSTRAP_SEED, level=LEVEL)
    return {"config": summary.config, "seeds": summary.seeds, "val_mean": summary.val_mean,
            "val_sd": summary.val_std, "test": {"value": interval.value, "low": interval.low, "high": interval.high}}
