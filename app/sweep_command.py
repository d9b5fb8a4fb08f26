"""`fusion grid --cache A.h5 --cache B.h5 ...` from start to end: check the caches are comparable, run the grid on
each (an ordinary grid directory per cache, app/grid_command.py), compare them (app/sweep.py), write sweep.json,
report.md and its figure (app/sweep_report.py), and show the comparison."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from rich.table import Table

from fusion.app.grid_command import run_grid_command
from fusion.app.sweep import RESAMPLES, SWEEP_FILE, compare, sweep_caches
from fusion.app.sweep_report import write_sweep_report
from fusion.atomic import write_text_atomic
from fusion.errors import FusionError
from fusion.heads.config import FitConfig


def run_sweep_command(paths: list[Path], configs_for: Callable[[dict], list[FitConfig]], out: Path, *,
                      load: Callable[[Path], tuple], tokens: bool = False, storage: str | None = None,
                      resamples: int = RESAMPLES, device=None, prune: bool = False) -> dict:
    """configs_for(cache meta) -> the grid; load(path) -> (features, meta), as `fusion grid` loads one cache; device
    and prune as `fusion grid` takes them."""
    from fusion.app.console import console

    if storage:
        raise FusionError("--storage shares one cache's grid between machines; a sweep (several --cache) runs here")
    caches = sweep_caches(paths)  # refused before any training when they cannot be compared
    rows, metric = {}, None
    for cache in caches:
        console.rule(f"{cache.name}: {cache.encoders}")
        features, meta = load(cache.path)
        configs = configs_for(meta)
        metric = configs[0].metric
        rows[cache.name] = run_grid_command(features, meta, configs, out / cache.name, storage=None, study="",
                                            sampler="grid", trials=None, tokens=tokens, device=device, prune=prune)
    document = compare(caches, rows, metric, resamples=resamples)
    write_text_atomic(out / SWEEP_FILE, json.dumps(document, indent=1, sort_keys=True))
    markdown, figure = write_sweep_report(out, document)
    console.rule("sweep")
    console.print(sweep_table(document))
    console.print(f"sweep: {out / SWEEP_FILE}, {markdown}, {figure}")
    return document


def sweep_table(document: dict) -> Table:
    """Each cache's chosen configuration with its test interval and its difference from the leader."""
    differences = {d["b"]: d for d in document["differences"] if d["what"] == "best"}
    table = Table(title=f"encoder sweep on {document['dataset']}: chosen on val {document['metric']}, test "
                        f"{document['metric']} with {document['level']:.0%} bootstrap CI")
    for column in ("cache", "encoders (pooling)", "head", "val", "test [CI]", f"Δ vs {document['leader']} [CI]"):
        table.add_column(column, no_wrap=column != "encoders (pooling)")
    for entry in document["caches"]:
        best, difference = entry["chosen"]["best"], differences.get(entry["name"])
        test = best["test"]
        table.add_row(entry["name"], entry["encoders"], best["config"]["head"], f"{best['val_mean']:.4f}",
                      f"{test['value']:.4f} [{test['low']:.4f}, {test['high']:.4f}]",
                      "leader" if difference is None else
                      f"{difference['difference']:+.4f} [{difference['low']:+.4f}, {difference['high']:+.4f}]")
    return table
