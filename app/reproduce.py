"""`fusion reproduce`: the paper's whole study in one command, resumable like every stage.

    fusion reproduce --data data/ --out reproduction/ --seeds 3
    fusion reproduce --data data/ --out reproduction/ --tokens --split-file mvsa-single=clmlf-mvsa-single.tsv

Under --data it looks for MVSA-Single (`MVSA_Single/`), MVSA-Multi (`MVSA/` or `MVSA_Multi/`) and Memotion
(`memotion_dataset_7k/`, directly or one folder down, with the official test files beside it when present); a dataset
not found is listed as skipped. Each one found is extracted to `OUT/caches/STEM.h5` (a complete cache is reused, an
interrupted one resumes), then the paper's grid plus the two ablations is trained with several seeds into
`OUT/grids/STEM/` (results.jsonl: a rerun trains only what is missing), selected on validation with the dataset's own
metric. STEM is the dataset's name, with `-tokens` when the cache holds token sequences and `-split-SHA` (the split
file's sha256 prefix) when a `--split-file` fixes its split, so caches and grids of other settings never mix.

With `--tokens` the cache also holds the token sequences (extracted once; free disk is checked first), the pooled
heads train on its pooled features as before, and dual_attn trains a second time on the token sequences into
`OUT/grids/STEM/dual_attn-tokens/`: real attention beside the single-key (pooled) variant. `OUT/reproduction.md` and
`OUT/figures/` set the result beside the published numbers (app/reporting/reproduction.py).
"""

from __future__ import annotations

import hashlib
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
from fusion.heads.runs import load_features, should_stream

MEMOTION_FOLDER = paper.DATASETS["memotion"].folders[0]
TOKEN_HEAD = "dual_attn"  # the one head that reads past token 0 (heads/models.py _cross)


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
    tokens: bool = False  # also extract token sequences and train dual_attn on them
    split_files: tuple[tuple[str, Path], ...] = ()  # (dataset, id,split file): a published split, applied by id
    dedupe: bool = False  # drop val/test posts that duplicate a training post (not the paper's protocol)

    def split_file(self, dataset: str) -> Path | None:
        return dict(self.split_files).get(dataset)


@dataclass
class DatasetResult:
    name: str
    root: Path
    cache: dict  # heads.runs.cache_meta: models, fingerprint, split source
    metric: str
    rows: list[dict]
    uncertainty: dict | None
    counts: dict[str, int] = field(default_factory=dict)  # test rows etc.
    split_counts: dict[str, int] = field(default_factory=dict)  # with a split file: ids it and the data do not share
    token_rows: list[dict] | None = None  # dual_attn trained on token sequences (--tokens)
    token_uncertainty: dict | None = None  # the pooled heads but dual_attn with dual_attn on tokens in its place


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
    for name, split_file in config.split_files:
        if name in skipped:
            skipped[name] += f"; its --split-file {split_file} was not used"
    results = [reproduce_dataset(config, name, root, progress) for name, root in found.items()]
    return Reproduction(config, results, skipped)


def cache_stem(config: ReproduceConfig, name: str) -> str:
    """The name of a dataset's cache and grid: one per setting that changes the cache (tokens, dedupe, split
    file)."""
    split_file = config.split_file(name)
    stem = name + ("-tokens" if config.tokens else "") + ("-dedupe" if config.dedupe else "")
    if split_file is not None:
        stem += f"-split-{hashlib.sha256(Path(split_file).read_bytes()).hexdigest()[:12]}"
    return stem


def reproduce_dataset(config: ReproduceConfig, name: str, root: Path, progress: Progress | None) -> DatasetResult:
    stem = cache_stem(config, name)
    cache_path = config.out / "caches" / f"{stem}.h5"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    extract_config = ExtractConfig(dataset=name, root=root, out=cache_path, text_model=config.text_model,
                                   image_model=config.image_model, device=config.device, precision=config.precision,
                                   batch_size=config.extract_batch_size, split_seed=config.split_seed,
                                   workers=config.workers, tokens=config.tokens, split_file=config.split_file(name),
                                   dedupe=config.dedupe)
    with progress_of(progress, f"extract {name}", "samples") as update:
        extraction = extract(extract_config, update)
    features, meta = load_features(cache_path)
    metric = paper.dataset_metric(name)
    base = FitConfig(epochs=config.epochs, patience=config.patience, batch_size=config.batch_size, metric=metric)
    configs = grid_configs(base, heads=config.heads, lrs=config.lrs, dropouts=config.dropouts,
                           losses=config.losses, seeds=range(config.seeds))
    rows = _grid(features, configs, config.out / "grids" / stem, f"grid {name}", "pooled", progress)
    labels = bootstrap_rows(features.get("test"))
    uncertainty = grid_uncertainty(rows, labels, metric, resamples=config.resamples)
    write_results(config.out / "grids" / stem, rows, metric=metric, cache=meta,
                  extra={"test_labels": labels, "uncertainty": uncertainty, "features": "pooled"})
    counts = {split: len(part) for split, part in features.items()}
    result = DatasetResult(name, root, meta, metric, rows, uncertainty, counts, dict(extraction.split_counts))
    if config.tokens and TOKEN_HEAD in config.heads:
        _token_attention(config, result, cache_path, [c for c in configs if c.head == TOKEN_HEAD], labels, stem,
                         progress)
    return result


def _grid(features, configs: list[FitConfig], grid_dir: Path, label: str, kind: str,
          progress: Progress | None) -> list[dict]:
    """Every configuration trained (or read back from grid_dir's results.jsonl), each row marked with the features
    it trained on ("pooled" or "tokens")."""
    with progress_of(progress, label, "configs") as update:
        rows = run_grid(features, configs, grid_dir, on_pass=update)
    return [{**row, "features": kind} for row in rows]


def _token_attention(config: ReproduceConfig, result: DatasetResult, cache_path: Path, configs: list[FitConfig],
                     labels: dict | None, stem: str, progress: Progress | None) -> None:
    """dual_attn on the token sequences, and the intervals and comparisons of the study read that way: the pooled
    heads' rows with these rows in place of pooled dual_attn's (app/reporting/uncertainty.py)."""
    grid_dir = config.out / "grids" / stem / f"{TOKEN_HEAD}-tokens"
    stream = should_stream(cache_path)[0]  # sequences too big for half the free memory are read per minibatch
    features, meta = load_features(cache_path, tokens=True, stream=stream)
    rows = _grid(features, configs, grid_dir, f"grid {result.name} ({TOKEN_HEAD} on tokens)", "tokens", progress)
    table = [row for row in result.rows if row["config"]["head"] != TOKEN_HEAD] + rows
    uncertainty = grid_uncertainty(table, labels, result.metric, resamples=config.resamples)
    write_results(grid_dir, rows, metric=result.metric, cache=meta,
                  extra={"test_labels": labels, "uncertainty": uncertainty, "features": "tokens",
                         "uncertainty_rows": f"the rows of grids/{stem}/ with these in place of pooled {TOKEN_HEAD}'s"})
    result.token_rows, result.token_uncertainty = rows, uncertainty
