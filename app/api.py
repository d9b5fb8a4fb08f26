"""The public Python API, re-exported by `fusion/__init__.py`. Every shell (the CLI, the server, the benchmarks) is
built on these calls, so each gives the numbers a notebook gets.

    import fusion
    cache = fusion.extract(dataset="mvsa-single", root="data/MVSA_Single", out="caches/mvsa-single.h5")
    run = fusion.fit(cache, head="self_attn")
    grid = fusion.grid(cache, out="runs/mvsa-single-grid")
    fusion.load_run(grid.best.path).predict(["meme.jpg"], ["not bad at all"])

Nothing here prints: progress goes to an optional `progress(description, unit)` (app/progress.py), and what a
command would tell its user comes back as `notes` on the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fusion import paper
from fusion.app.progress import Progress, progress_of
from fusion.device import check_device_name, check_encoder_precision, training_device
from fusion.errors import FusionError
from fusion.extract.datasets.registry import check_dataset
from fusion.heads.config import FitConfig
from fusion.heads.search.configs import grid_configs

if TYPE_CHECKING:  # imported on first use: `import fusion` and a command's argument checks stay free of torch
    from fusion.app.handles import Cache, GridResult, Run
    from fusion.app.predictor import Predictor


def extract(*, dataset: str, root: Path | str, out: Path | str | None = None, text_model: str = paper.TEXT_MODEL,
            image_model: str = paper.IMAGE_MODEL, tokens: bool = False, device: str = "auto",
            precision: str | None = None, split_file: Path | str | None = None, columns: str | None = None,
            text_pooling: str | None = None, image_pooling: str | None = None, batch_size: int = 32,
            limit: int | None = None, max_length: int = 128, workers: int | None = None, seed: int = 0,
            trust_remote_code: bool = False, dedupe: bool = False, progress: Progress | None = None) -> Cache:
    """Run the frozen encoders once over a dataset as downloaded and write the embeddings cache (resumable; under
    torchrun each rank takes its share). Returns the cache, with `.extraction` saying what this run did. Posts shared
    across splits are counted; `dedupe` drops the val and test posts that duplicate a training post."""
    check_dataset(dataset, Path(root), columns)
    check_device_name(device)
    check_encoder_precision(precision or "fp32")
    if split_file is not None:
        _require(Path(split_file), "split file")
    from fusion.app.handles import Cache
    from fusion.extract.distributed import distributed_context
    from fusion.extract.encoders import quiet_transformers
    from fusion.extract.pipeline import ExtractConfig, extract as run_extract

    quiet_transformers()
    out = Path(out) if out is not None else Path("caches") / f"{dataset}.h5"
    config = ExtractConfig(dataset=dataset, root=Path(root), out=out, text_model=text_model, image_model=image_model,
                           device=device, precision=precision or "fp32", batch_size=batch_size, tokens=tokens,
                           limit=limit, max_length=max_length, split_seed=seed, workers=workers,
                           trust_remote_code=trust_remote_code,
                           split_file=Path(split_file) if split_file is not None else None,
                           text_pooling=text_pooling, image_pooling=image_pooling, columns=columns, dedupe=dedupe)
    out.parent.mkdir(parents=True, exist_ok=True)
    with distributed_context() as (rank, world_size):
        named = f"extract {dataset}" + (f" rank {rank}" if world_size > 1 else "")
        with progress_of(progress, named, "samples") as update:
            summary = run_extract(config, update, rank=rank, world_size=world_size)
    return Cache.open(out, extraction=summary)


def open_cache(path: Path | str) -> Cache:
    """A cache file (or the .partial folder of an interrupted extraction) as a Cache."""
    from fusion.app.handles import Cache

    return Cache.open(path)


def fit(cache: Cache | Path | str, *, head: str = FitConfig.head, lr: float = FitConfig.lr,
        dropout: float = FitConfig.dropout, loss: str = FitConfig.loss,
        gamma: float = FitConfig.gamma, epochs: int = FitConfig.epochs,
        patience: int = FitConfig.patience, seed: int = FitConfig.seed,
        batch_size: int = FitConfig.batch_size, metric: str | None = None, tokens: bool = False,
        stream: bool | None = None, precision: str = FitConfig.precision, device: str = "auto",
        out: Path | str | None = None, progress: Progress | None = None) -> Run:
    """Train one head on a cache (early stopping on the validation metric, the dataset's own unless `metric`
    says); writes config.json, metrics.json and head.safetensors to `out` (default runs/CACHE-HEAD)."""
    path = _cache_path(cache)
    dataset = _cache_dataset(path)
    config = FitConfig(head=head, lr=lr, dropout=dropout, loss=loss, gamma=gamma, epochs=epochs, patience=patience,
                       batch_size=batch_size, metric=metric or paper.dataset_metric(dataset), seed=seed,
                       precision=precision)
    target = training_device(device, precision)  # checks the names before torch loads
    from fusion.app.handles import Run
    from fusion.heads.checkpoint import save_run
    from fusion.heads.registry import pooled_dual_attn_note
    from fusion.heads.train import train_head

    features, meta, notes = _features(path, tokens, stream)
    with progress_of(progress, f"fit {head}", "epochs") as update:
        on_epoch = (lambda epoch, _model, _metrics: update(epoch, config.epochs)) if update else None
        result = train_head(features, config, on_epoch=on_epoch, device=target)
        if update:
            update(result.epochs_run, result.epochs_run)  # an early stop ends the bar where training ended
    run_dir = Path(out) if out is not None else Path("runs") / f"{path.stem}-{head}"
    save_run(run_dir, result, cache=meta, tokens=tokens)
    if note := pooled_dual_attn_note([head], tokens):
        notes.append(note)
    return Run.read(run_dir, notes=tuple(notes))


def grid(cache: Cache | Path | str, *, heads: Iterable[str] = paper.HEADS, lrs: Iterable[float] = paper.LRS,
         dropouts: Iterable[float] = paper.DROPOUTS, losses: Iterable[str] = paper.LOSSES,
         seeds: int | Iterable[int] = 1, epochs: int = FitConfig.epochs,
         patience: int = FitConfig.patience, batch_size: int = FitConfig.batch_size,
         metric: str | None = None, prune: bool = False, tokens: bool = False, stream: bool | None = None,
         precision: str = FitConfig.precision, device: str = "auto", storage: str | None = None,
         study: str = "fusion-grid", sampler: str = "grid", trials: int | None = None,
         out: Path | str | None = None, progress: Progress | None = None) -> GridResult:
    """The paper's grid (144 configurations by default) on one cache, resumable; `seeds` is a count or the seeds
    themselves. The configuration chosen on validation is retrained into `out/best` (default runs/CACHE-grid)."""
    path = _cache_path(cache)
    configs_for = _grid_configs(heads, lrs, dropouts, losses, seeds, epochs, patience, batch_size, metric, precision)
    configs = configs_for({"dataset": _cache_dataset(path)})
    target = training_device(device, precision)  # checks the names before torch loads
    from fusion.app.grid import run_grid_to

    features, meta, notes = _features(path, tokens, stream)
    result = run_grid_to(features, meta, configs, Path(out) if out is not None else
                         Path("runs") / f"{path.stem}-grid", storage=storage, study=study, sampler=sampler,
                         trials=trials, tokens=tokens, device=target, prune=prune, progress=progress)
    return dataclasses.replace(result, notes=tuple(notes) + result.notes)


def sweep(caches: Sequence[Cache | Path | str], *, heads: Iterable[str] = paper.HEADS,
          lrs: Iterable[float] = paper.LRS, dropouts: Iterable[float] = paper.DROPOUTS,
          losses: Iterable[str] = paper.LOSSES, seeds: int | Iterable[int] = 1, epochs: int = FitConfig.epochs,
          patience: int = FitConfig.patience, batch_size: int = FitConfig.batch_size,
          metric: str | None = None, prune: bool = False, tokens: bool = False, stream: bool | None = None,
          precision: str = FitConfig.precision, device: str = "auto", out: Path | str | None = None,
          progress: Progress | None = None):
    """The same grid on several caches of one dataset (other encoders), compared on the same test rows."""
    paths = [_cache_path(cache) for cache in caches]
    configs_for = _grid_configs(heads, lrs, dropouts, losses, seeds, epochs, patience, batch_size, metric, precision)
    for path in paths:
        configs_for({"dataset": _cache_dataset(path)})
    target = training_device(device, precision)  # checks the names before torch loads
    from fusion.app.sweep import run_sweep_to

    return run_sweep_to(paths, configs_for, Path(out) if out is not None else Path("runs") / f"{paths[0].stem}-sweep",
                        load=lambda cache_path: _features(cache_path, tokens, stream)[:2], tokens=tokens,
                        device=target, prune=prune, progress=progress)


def load_run(path: Path | str, *, device: str = "auto", precision: str | None = None) -> Predictor:
    """A run directory (written by fit, or a grid's best/) ready to label new posts: `.predict(images, texts)`."""
    from fusion.app.handles import require_run_dir

    require_run_dir(Path(path))
    check_device_name(device)
    if precision is not None:
        check_encoder_precision(precision)
    from fusion.app.predictor import Predictor
    from fusion.extract.encoders import quiet_transformers

    quiet_transformers()
    return Predictor.load(path, device=device, precision=precision)


def read_posts(csv: Path | str) -> tuple[list[Path], list[str], list[int]]:
    """(images, texts, line numbers) of a CSV with columns `image` and `text`, for `load_run(...).predict`; relative
    image paths are resolved against the CSV's folder."""
    from fusion.extract.datasets.textio import read_csv

    table = read_csv(Path(csv), required=("image", "text"))
    rows = [(Path(csv).parent / row["image"].strip(), row["text"].strip(), line) for line, row in table.rows]
    return [row[0] for row in rows], [row[1] for row in rows], [row[2] for row in rows]


def report(run: Path | str):
    """Figures and report.md for a run directory or a grid directory; returns their paths (.markdown, .figures)."""
    _require(Path(run), "run or grid directory", folder=True)
    from fusion.app.reporting.report import write_report

    return write_report(Path(run))


@dataclass(frozen=True)
class ReproductionResult:
    markdown: Path
    figures: list[Path]
    reproduction: object  # app/reproduce.py Reproduction: per dataset, its grid rows and intervals

    @property
    def skipped(self) -> dict[str, str]:
        return self.reproduction.skipped


def reproduce(*, data: Path | str, out: Path | str = "reproduction", seeds: int = 3,
              text_model: str = paper.TEXT_MODEL, image_model: str = paper.IMAGE_MODEL, device: str = "auto",
              precision: str = "fp32", workers: int = 1, heads: Iterable[str] = paper.HEADS + paper.ABLATIONS,
              lrs: Iterable[float] = paper.LRS, dropouts: Iterable[float] = paper.DROPOUTS,
              losses: Iterable[str] = paper.LOSSES, epochs: int = FitConfig.epochs,
              patience: int = FitConfig.patience, resamples: int | None = None, tokens: bool = False,
              split_files: Mapping[str, Path | str] | None = None, dedupe: bool = False,
              progress: Progress | None = None) -> ReproductionResult:
    """The paper's study: every dataset found under `data` extracted, its grid and ablations trained with several
    seeds, and reproduction.md written with intervals beside the published numbers (resumable).

    tokens: also extract token sequences and train dual_attn on them beside the pooled heads; split_files:
    {dataset: id,split file} fixing a dataset's split (a published one, e.g. {"mvsa-single": "clmlf.tsv"});
    dedupe: drop validation and test posts that duplicate a training post (off: the paper's protocol)."""
    _require(Path(data), "data folder", folder=True)
    check_device_name(device)
    check_encoder_precision(precision)
    split_files = _split_files(split_files or {})
    from fusion.app.reporting.reproduction import write_reproduction
    from fusion.app.reproduce import ReproduceConfig, reproduce as run_reproduce
    from fusion.extract.encoders import quiet_transformers

    quiet_transformers()
    config = ReproduceConfig(data=Path(data), out=Path(out), seeds=seeds, text_model=text_model,
                             image_model=image_model, device=device, precision=precision, workers=workers,
                             heads=tuple(heads), lrs=tuple(float(lr) for lr in lrs),
                             dropouts=tuple(float(d) for d in dropouts), losses=tuple(losses), epochs=epochs,
                             patience=patience, tokens=tokens, split_files=split_files, dedupe=dedupe,
                             **({} if resamples is None else {"resamples": resamples}))
    reproduction = run_reproduce(config, progress)
    markdown, figures = write_reproduction(reproduction)
    return ReproductionResult(markdown, figures, reproduction)


def _split_files(split_files: Mapping[str, Path | str]) -> tuple[tuple[str, Path], ...]:
    """(dataset, file) pairs, checked before anything heavy loads: a dataset of the paper, a file that exists."""
    for name, path in split_files.items():
        if name not in paper.DATASETS:
            raise FusionError(f"--split-file {name}=...: {name!r} is not one of {', '.join(paper.DATASETS)}")
        _require(Path(path), f"split file for {name}")
    return tuple((name, Path(path)) for name, path in split_files.items())


def _cache_path(cache: Cache | Path | str) -> Path:
    return Path(getattr(cache, "path", cache))


def _cache_dataset(path: Path) -> str:
    """The dataset a cache file holds, read from its header: a missing, damaged or foreign file is refused here,
    before torch loads."""
    from fusion.cache.reader import check_header, open_cache

    with open_cache(path) as h5:
        return check_header(h5, path)["dataset"]


def _require(path: Path, what: str, *, folder: bool = False) -> Path:
    if not (path.is_dir() if folder else path.exists()):
        raise FusionError(f"{path}: no such {what}")
    return path



def _grid_configs(heads, lrs, dropouts, losses, seeds, epochs, patience, batch_size, metric, precision):
    """configs_for(cache meta): the grid's configurations, selected on `metric` or the cache's dataset's own."""
    seed_list = range(seeds) if isinstance(seeds, int) else list(seeds)

    def configs_for(meta: dict) -> list:
        base = FitConfig(epochs=epochs, patience=patience, batch_size=batch_size,
                         metric=metric or paper.dataset_metric(meta["dataset"]), precision=precision)
        return grid_configs(base, heads=list(heads), lrs=[float(lr) for lr in lrs],
                            dropouts=[float(d) for d in dropouts], losses=list(losses), seeds=seed_list)

    return configs_for


def _features(path: Path, tokens: bool, stream: bool | None) -> tuple[dict, dict, list[str]]:
    """(features by split, the cache's meta, notes). With tokens and no choice made, the sequences are streamed
    from disk when loading them would take over half the memory available."""
    from fusion.heads.runs import load_features, should_stream

    if stream and not tokens:
        raise FusionError("--stream applies to token sequences (add --tokens); pooled features are always loaded, "
                          "they take tens of MB")
    notes = []
    if tokens and stream is None:
        stream, needed, available = should_stream(path)
        if stream:
            notes.append(f"loading the token sequences would take {needed / 2**30:.1f} GiB, over half of the "
                         f"{available / 2**30:.1f} GiB available: each minibatch is read from the cache")
    features, meta = load_features(path, tokens=tokens, stream=bool(stream))
    return features, meta, notes
