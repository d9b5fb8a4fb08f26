"""A sweep from start to end (`fusion grid --cache A.h5 --cache B.h5 ...`): check the caches are comparable, run the
grid on each (an ordinary grid directory per cache, app/grid.py), compare them (app/reporting/sweep.py), and write
sweep.json, report.md and its figure (app/reporting/sweep_report.py). Prints nothing; the CLI draws the result."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fusion.app.grid import run_grid_to
from fusion.app.handles import GridResult
from fusion.app.progress import Progress
from fusion.app.reporting.stats import RESAMPLES
from fusion.app.reporting.sweep import SWEEP_FILE, compare, sweep_caches
from fusion.app.reporting.sweep_report import write_sweep_report
from fusion.atomic import write_text_atomic
from fusion.errors import FusionError
from fusion.heads.config import FitConfig


@dataclass(frozen=True)
class SweepResult:
    path: Path
    document: dict  # sweep.json
    grids: dict[str, GridResult]  # cache name -> its grid
    markdown: Path
    figure: Path


def run_sweep_to(paths: list[Path], configs_for: Callable[[dict], list[FitConfig]], out: Path, *,
                 load: Callable[[Path], tuple], tokens: bool = False, storage: str | None = None,
                 resamples: int = RESAMPLES, device=None, prune: bool = False,
                 progress: Progress | None = None) -> SweepResult:
    """configs_for(cache meta) -> the grid; load(path) -> (features, meta), as a grid loads one cache; device and
    prune as a grid takes them."""
    if storage:
        raise FusionError("--storage shares one cache's grid between machines; a sweep (several --cache) runs here")
    caches = sweep_caches(paths)  # refused before any training when they cannot be compared
    grids, metric = {}, None
    for cache in caches:
        features, meta = load(cache.path)
        configs = configs_for(meta)
        metric = configs[0].metric
        named = (lambda description, unit, name=cache.name: progress(f"{name}: {description}", unit)) \
            if progress else None
        grids[cache.name] = run_grid_to(features, meta, configs, out / cache.name, tokens=tokens, device=device,
                                        prune=prune, progress=named)
    document = compare(caches, {name: grid.rows for name, grid in grids.items()}, metric, resamples=resamples)
    write_text_atomic(out / SWEEP_FILE, json.dumps(document, indent=1, sort_keys=True))
    markdown, figure = write_sweep_report(out, document)
    return SweepResult(out, document, grids, markdown, figure)
