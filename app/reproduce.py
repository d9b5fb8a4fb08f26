"""`fusion reproduce`: the paper's whole study in one command, resumable like every stage.

    fusion reproduce --data data/ --out reproduction/ --seeds 3

Under --data it looks for MVSA-Single (`MVSA_Single/`), MVSA-Multi (`MVSA/` or `MVSA_Multi/`) and Memotion
(`memotion_dataset_7k/`, directly or one folder down, with the official test files beside it when present); a dataset
not found is listed as skipped. Each one found is extracted to `OUT/caches/NAME.h5` (a complete cache is reused, an
interrupted one resumes), then the paper's grid plus the two ablations is trained with several seeds into
`OUT/grids/NAME/` (results.jsonl: a rerun trains only what is missing), selected on validation with the dataset's own
metric. `OUT/reproduction.md` and `OUT/figures/` set the result beside the published numbers
(app/reporting/reproduction.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fusion.app.progress import Progress, progress_of
from fusion.app.reporting.stats import RESAMPLES
from fusion.app.reporting.uncertainty import bootstrap_rows, grid_uncertainty
from fusion.extract.datasets.mvsa import LABEL_FILE
from fusion.extract.pipeline import ExtractConfig, extract
from fusion.heads.config import FitConfig
from fusion import paper
from fusion.heads.search.grid import run_grid
from fusion.heads.search.configs import grid_configs
from fusion.heads.search.output import write_results
from fusion.heads.runs import load_features

MEMOTION_FOLDER = paper.DATASETS["memotion"].folders[0]



@dataclass(frozen=True)
class ReproduceConfig:
    data: Path
    out: Path
    seeds: int = 3
    text_model: str = paper.TEXT_MODEL
    image_model: str = paper.IMAGE_MODEL
    device: str = "auto"
    precision: str = "fp32"
    extract_batch_size: int = 32
    workers: int = 1
    split_seed: int = 0
    heads: tuple[str, ...] = paper.HEADS + paper.ABLATIONS
    lrs: tuple[float, ...] = paper.LRS
    dropouts: tuple[float, ...] = paper.DROPOUTS
    losses: tuple[str, ...] = paper.LOSSES
    epochs: int = 30
    patience: int = 5
    batch_size: int = 256
    resamples: int = RESAMPLES


@dataclass
class DatasetResult:
    name: str
    root: Path
    cache: dict  # heads.runs.cache_meta: models, fingerprint, split source
    metric: str
    rows: list[dict]
    uncertainty: dict | None
    counts: dict[str, int] = field(default_factory=dict)  # test rows etc.


@dataclass
class Reproduction:
    config: ReproduceConfig
    results: list[DatasetResult]
    skipped: dict[str, str]  # dataset -> why


def find_datasets(data: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """({dataset: the --root to extract it from}, {dataset: why it was skipped})."""
    data = Path(data)
    found: dict[str, Path] = {}
    for name in ("mvsa-single", "mvsa-multi"):
        hits = [data / folder for folder in paper.DATASETS[name].folders if _is_mvsa(data / folder)]
        if hits:
            found[name] = hits[0]
    memotion = [folder.parent for folder in [data / MEMOTION_FOLDER, *sorted(data.glob(f"*/{MEMOTION_FOLDER}"))]
                if (folder / "labels.csv").is_file()]
    if memotion:
        found["memotion"] = memotion[0]
    expected = {"mvsa-single": "MVSA_Single/", "mvsa-multi": "MVSA/ or MVSA_Multi/",
                "memotion": f"{MEMOTION_FOLDER}/labels.csv"}
    skipped = {name: f"not found under {data} (looked for {expected[name]})" for name in paper.DATASETS
               if name not in found}
    return found, skipped


def _is_mvsa(folder: Path) -> bool:
    return (folder / LABEL_FILE).is_file() and (folder / "data").is_dir()


def reproduce(config: ReproduceConfig, progress: Progress | None = None) -> Reproduction:
    """Extract, train and score every dataset found; returns what the report needs (app/reporting/reproduction.py)."""
    found, skipped = find_datasets(config.data)
    results = [reproduce_dataset(config, name, root, progress) for name, root in found.items()]
    return Reproduction(config, results, skipped)


def reproduce_dataset(config: ReproduceConfig, name: str, root: Path, progress: Progress | None) -> DatasetResult:
    cache_path = config.out / "caches" / f"{name}.h5"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    extract_config = ExtractConfig(dataset=name, root=root, out=cache_path, text_model=config.text_model,
                                   image_model=config.image_model, device=config.device, precision=config.precision,
                                   batch_size=config.extract_batch_size, split_seed=config.split_seed,
                                   workers=config.workers)
    with progress_of(progress, f"extract {name}", "samples") as update:
        extract(extract_config, update)
    features, meta = load_features(cache_path)
    metric = paper.dataset_metric(name)
    base = FitConfig(epochs=config.epochs, patience=config.patience, batch_size=config.batch_size, metric=metric)
    configs = grid_configs(base, heads=config.heads, lrs=config.lrs, dropouts=config.dropouts,
                           losses=config.losses, seeds=range(config.seeds))
    grid_dir = config.out / "grids" / name
    with progress_of(progress, f"grid {name}", "configs") as update:
        rows = run_grid(features, configs, grid_dir, on_pass=update)
    labels = bootstrap_rows(features.get("test"))
    uncertainty = grid_uncertainty(rows, labels, metric, resamples=config.resamples)
    write_results(grid_dir, rows, metric=metric, cache=meta, extra={"test_labels": labels, "uncertainty": uncertainty})
    counts = {split: len(part) for split, part in features.items()}
    return DatasetResult(name, root, meta, metric, rows, uncertainty, counts)

