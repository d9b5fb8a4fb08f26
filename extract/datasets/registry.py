"""The dataset readers by name: what `fusion extract --dataset NAME --root DIR` reads.

Readers are imported when a dataset is read, not when the registry is: a command refuses an unknown name, a stray
--columns or a missing --root at once, before numpy, scikit-learn or torch load.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from fusion.errors import DatasetError

# name -> (module under fusion/extract/datasets/, its reader, fixed keyword arguments)
READERS: dict[str, tuple[str, str, dict]] = {
    "memotion": ("memotion", "load_memotion", {}),
    "mvsa-single": ("mvsa", "load_mvsa", {"kind": "single"}),
    "mvsa-multi": ("mvsa", "load_mvsa", {"kind": "multi"}),
    "csv": ("csvdata", "load_csv", {}),
    "demo": ("demo_data", "load_demo", {}),
    "hf": ("hfdata", "load_hf", {}),
}
DATASETS = tuple(READERS)
TAKES_COLUMNS = {"hf"}  # readers told which columns hold the image, text and label (--columns)
# What --root names for each dataset (the readers say it too when a root is wrong).
ROOTS = {"memotion": "the folder holding memotion_dataset_7k/labels.csv",
         "mvsa-single": "an MVSA folder holding labelResultAll.txt and data/",
         "mvsa-multi": "an MVSA folder holding labelResultAll.txt and data/",
         "csv": "a CSV file with image, text and label columns",
         "hf": "a folder written by save_to_disk, or Parquet files",
         "demo": "the folder the demo's data is written to"}


def check_dataset(name: str, root: Path, columns: str | None = None) -> None:
    """The checks that need no reader: a known name, --columns only where it applies, a --root that exists (the
    demo writes its own)."""
    if name not in READERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if columns is not None and name not in TAKES_COLUMNS:
        raise DatasetError(f"--columns applies to --dataset {' or '.join(sorted(TAKES_COLUMNS))}, not {name}")
    if name != "demo" and not Path(root).expanduser().exists():
        raise DatasetError(f"{root}: not found; expected {ROOTS[name]}")


def load_dataset(name: str, root: Path, *, seed: int = 0, columns: str | None = None):
    """Read dataset `name` from `root` (extract/datasets/samples.py DatasetSamples); splits are deterministic for a
    given seed."""
    check_dataset(name, root, columns)
    module, reader, fixed = READERS[name]
    load = getattr(importlib.import_module(f"fusion.extract.datasets.{module}"), reader)
    options = {"columns": columns} if name in TAKES_COLUMNS else {}
    return load(Path(root).expanduser(), seed=seed, **fixed, **options)

