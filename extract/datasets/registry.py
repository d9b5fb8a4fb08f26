"""The dataset readers by name: what `fusion extract --dataset NAME --root DIR` reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path

from fusion.errors import DatasetError
from fusion.extract.datasets.csvdata import load_csv
from fusion.extract.datasets.demo_data import write_demo_dataset
from fusion.extract.datasets.hfdata import load_hf
from fusion.extract.datasets.memotion import load_memotion
from fusion.extract.datasets.mvsa import load_mvsa
from fusion.extract.datasets.samples import DatasetSamples



def load_demo(root: Path, *, seed: int = 0) -> DatasetSamples:
    """The embedded synthetic dataset: written into `root` when absent, read by the real MVSA-Single reader, and
    named `demo` so that nothing downstream mistakes it for MVSA-Single."""
    folder = root / "MVSA_Single"
    if not (folder / "labelResultAll.txt").exists():
        write_demo_dataset(root, seed=seed)
    return dataclasses.replace(load_mvsa(folder, kind="single", seed=seed), name="demo")


DATASETS: dict[str, Callable[..., DatasetSamples]] = {
    "memotion": load_memotion,
    "mvsa-single": partial(load_mvsa, kind="single"),
    "mvsa-multi": partial(load_mvsa, kind="multi"),
    "csv": load_csv,
    "demo": load_demo,
    "hf": load_hf,
}
TAKES_COLUMNS = {"hf"}  # readers told which columns hold the image, text and label (--columns)


def load_dataset(name: str, root: Path, *, seed: int = 0, columns: str | None = None) -> DatasetSamples:
    """Read dataset `name` from `root`; splits are deterministic for a given seed."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if columns is not None and name not in TAKES_COLUMNS:
        raise DatasetError(f"--columns applies to --dataset {' or '.join(sorted(TAKES_COLUMNS))}, not {name}")
    options = {"columns": columns} if name in TAKES_COLUMNS else {}
    return DATASETS[name](Path(root).expanduser(), seed=seed, **options)
