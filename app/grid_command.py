"""`fusion grid` from start to end: train (locally or through a shared Optuna study), write the results, retrain and
save the chosen configuration as a run directory, and show the tables."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fusion.app.uncertainty import bootstrap_rows, grid_uncertainty
from fusion.atomic import write_text_atomic
from fusion.errors import FusionError
from fusion.heads.checkpoint import save_run
from fusion.heads.config import FitConfig, config_from_dict
from fusion.heads.grid import best_per_head, run_grid, summarise
from fusion.heads.grid_output import write_results
from fusion.heads.registry import pooled_dual_attn_note
from fusion.heads.prune import Pruning
from fusion.heads.train import train_head


def run_grid_command(features, meta: dict, configs: list[FitConfig], out: Path, *, storage: str | None,
                     study: str, sampler: str, trials: int | None, tokens: bool = False, device=None,
                     prune: bool = False) -> list[dict]:
    """tokens: the features are token sequences (recorded with the best run, so predict feeds it the same).
    device: where to train (None: where the features are); prune: successive halving inside each pass."""
    from fusion.app.console import console, grid_tables, progress_bar

    if prune and storage:
        raise FusionError("--prune ranks the models of one vectorised pass; a shared --storage study trains one "
                          "configuration at a time: use one or the other")
    pruning = Pruning() if prune else None
    if note := pooled_dual_attn_note([config.head for config in configs], tokens):
        console.print(f"note: {note}", soft_wrap=True)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "grid.json", json.dumps({"cache": meta, "configs": [dataclasses.asdict(c) for c in configs],
                                                     "prune": pruning and dataclasses.asdict(pruning),
                                                     "device": str(device)}, indent=1))
    metric = configs[0].metric
    if storage:
        from fusion.heads.grid_optuna import run_study

        with progress_bar("grid (optuna)", "configs") as update:
            count = {"n": 0}

            def on_trial(_row: dict) -> None:
                count["n"] += 1
                update(count["n"], len(configs))

            rows = run_study(features, configs, storage=storage, study_name=study, sampler=sampler, trials=trials,
                             on_trial=on_trial, device=device)
    else:
        with progress_bar("grid", "configs") as update:
            rows = run_grid(features, configs, out, on_pass=update, prune=pruning, device=device)
    labels = bootstrap_rows(features.get("test"))
    write_results(out, rows, metric=metric, cache=meta,
                  extra={"test_labels": labels, "uncertainty": grid_uncertainty(rows, labels, metric)})
    summaries = summarise(rows, metric)
    best = summaries[0]
    chosen = config_from_dict({**best.config, "seed": best.seeds[0]})
    save_run(out / "best", train_head(features, chosen, device=device), cache=meta, tokens=tokens)
    for table in grid_tables(summaries, best_per_head(summaries), metric):
        console.print(table)
    if pruning:
        pruned = [row for row in rows if row.get("pruned_at") is not None]
        console.print(f"--prune: {len(pruned)} of {len(rows)} configurations stopped at a rung "
                      f"(epochs {', '.join(map(str, pruning.rungs(max(c.epochs for c in configs))))}); "
                      f"{sum(row['epochs_run'] for row in rows)} epochs trained in all")
    console.print(f"{len(rows)} results in {out / 'results.csv'}; the configuration chosen on validation is in "
                  f"{out / 'best'}")
    return rows
