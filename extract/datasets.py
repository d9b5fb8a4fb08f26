"""The dataset readers by name: what `fusion extract --dataset NAME --root DIR` reads."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from fusion.errors import DatasetError
from fusion.extract.csvdata import load_csv
from fusion.extract.memotion import load_memotion
from fusion.extract.mvsa import load_mvsa
from fusion.extract.samples import DatasetSamples

DATASETS: dict[str, Callable[..., DatasetSamples]] = {
    "memotion": load_memotion,
    "mvsa-single": partial(load_mvsa, kind="single"),
    "mvsa-multi": partial(load_mvsa, kind="multi"),
    "csv": load_csv,
}


def load_dataset(name: str, root: Path, *, seed: int = 0) -> DatasetSamples:
    """Read dataset `name` from `root`; splits are deterministic for a given seed."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](Path(root).expanduser(), seed=seed)
