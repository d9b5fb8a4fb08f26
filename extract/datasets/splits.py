"""Stratified, seeded splits computed on the label list alone (before any file is read).

Sizes: each held-out part is 10% of the rows, to the nearest ten from 1,000 rows up. That rule gives the sizes of
the MVSA splits in the literature (Single 4,511 -> 3,611/450/450, Multi 17,024 -> 13,624/1,700/1,700), which plain
rounding does not (it gives 451 and 1,702). Only the sizes match: which posts fall in which part is this module's
seeded stratified draw, not any published split, so numbers measured on it are not like for like with published
ones. A published split is applied by id with `--split-file` (extract/datasets/splitfile.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from sklearn.model_selection import train_test_split

HELD_OUT_FRACTION = 0.1


def held_out_size(n: int) -> int:
    """Rows in one 10% part (val or test) of n rows."""
    if n >= 1000:
        return round(n / 100) * 10
    return round(n * HELD_OUT_FRACTION)


def split_sizes(n: int) -> tuple[int, int, int]:
    """(train, val, test) sizes of the 8:1:1 split of n rows."""
    held_out = held_out_size(n)
    return n - 2 * held_out, held_out, held_out


def holdout(labels: Sequence[int], n_out: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices (kept, held out), each in ascending order; `n_out` rows held out, stratified by label.

    Stratification needs at least two rows per class and room for every class on both sides; tiny or
    single-row-class label lists fall back to a plain seeded shuffle split.
    """
    indices = list(range(len(labels)))
    if n_out <= 0:
        return indices, []
    if n_out >= len(labels):
        return [], indices
    stratify = list(labels) if _can_stratify(labels, n_out) else None
    kept, out = train_test_split(indices, test_size=n_out, stratify=stratify, random_state=seed)
    return sorted(kept), sorted(out)


def _can_stratify(labels: Sequence[int], n_out: int) -> bool:
    counts = Counter(labels)
    classes = len(counts)
    return min(counts.values()) >= 2 and n_out >= classes and len(labels) - n_out >= classes


def split_8_1_1(labels: Sequence[int], seed: int) -> list[str]:
    """Split name for each row: test and val each `held_out_size(n)` rows, stratified and seeded."""
    _, val, test = split_sizes(len(labels))
    return _three_way(labels, test, val, seed)


def split_pool(labels: Sequence[int], seed: int, *, has_test: bool) -> list[str]:
    """Memotion's pool: val is 10% of the training rows; test is 10% of the pool unless an official test exists."""
    if has_test:
        return _three_way(labels, 0, held_out_size(len(labels)), seed)
    test = held_out_size(len(labels))
    return _three_way(labels, test, held_out_size(len(labels) - test), seed)


def _three_way(labels: Sequence[int], n_test: int, n_val: int, seed: int) -> list[str]:
    splits = ["train"] * len(labels)
    rest, test = holdout(labels, n_test, seed)
    for i in test:
        splits[i] = "test"
    _, val = holdout([labels[i] for i in rest], n_val, seed)
    for j in val:
        splits[rest[j]] = "val"
    return splits
