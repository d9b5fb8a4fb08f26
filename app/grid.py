"""A grid from start to end: train (locally, or through a shared Optuna study), write the results with their test
intervals, then retrain and save the configuration chosen on validation as `best/`. Prints nothing: the API returns
a GridResult and the CLI draws it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fusion.app.handles import GridResult, Run
from fusion.app.progress import Progress, progress_of
from fusion.app.reporting.uncertainty import bootstrap_rows, grid_uncertainty
from fusion.atomic import write_text_atomic
from fusion.errors import FusionError
from fusion.heads.checkpoint import save_run
from fusion.heads.config import FitConfig, config_from_dict
from fusion.heads.registry import pooled_dual_attn_note
from fusion.heads.search.grid import RESULTS_LOG, run_grid
from fusion.heads.search.summary import summarise
from fusion.heads.search.output import write_results
from fusion.heads.search.prune import Pruning
from fusion.heads.train import train_head


def run_grid_to(features, meta: dict, configs: list[FitConfig], out: Path, *, storage: str | None = None,
                study: str = "fusion-grid", sampler: str = "grid", trials: int | None = None, tokens: bool = False,
                device=None, prune: bool = False, progress: Progress | None = None) -> GridResult:
    """tokens: the features are token sequences (recorded with the best run, so predict feeds it the same).
    device: where to train (None: where the features are); prune: successive halving inside each pass;
    progress(description, unit) -> a context yielding update(done, total), or None."""
    if prune and storage:
        raise FusionError("--prune ranks the models of one vectorised pass; a shared --storage study trains one "
                          "configuration at a time: use one or the other")
    pruning = Pruning() if prune else None
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "grid.json", json.dumps({"cache": meta, "configs": [dataclasses.asdict(c) for c in configs],
                                                     "prune": pruning and dataclasses.asdict(pruning),
                                                     "device": str(device)}, indent=1))
    metric = configs[0].metric
    done_before: list[int] = []  # what run_grid reports first: the configurations results.jsonl already holds
    if storage:
        rows = _study_rows(features, configs, storage, study, sampler, trials, device, progress)
    else:
        with progress_of(progress, "grid", "configs") as update:
            def on_pass(done: int, total: int) -> None:
                if not done_before:
                    done_before.append(done)
                if update:
                    update(done, total)

            rows = run_grid(features, configs, out, on_pass=on_pass, prune=pruning, device=device)
    labels = bootstrap_rows(features.get("test"))
    write_results(out, rows, metric=metric, cache=meta,
                  extra={"test_labels": labels, "uncertainty": grid_uncertainty(rows, labels, metric)})
    best = summarise(rows, metric)[0]
    chosen = config_from_dict({**best.config, "seed": best.seeds[0]})
    save_run(out / "best", train_head(features, chosen, device=device), cache=meta, tokens=tokens)
    notes = [note] if (note := pooled_dual_attn_note([config.head for config in configs], tokens)) else []
    if done_before == [len(configs)]:
        notes.append(f"all {len(configs)} configurations were already in {out / RESULTS_LOG}: none was trained "
                     f"again (only best/ was retrained)")
    if pruning:
        pruned = [row for row in rows if row.get("pruned_at") is not None]
        notes.append(f"--prune: {len(pruned)} of {len(rows)} configurations stopped at a rung (epochs "
                     f"{', '.join(map(str, pruning.rungs(max(c.epochs for c in configs))))}); "
                     f"{sum(row['epochs_run'] for row in rows)} epochs trained in all")
    return GridResult(out, rows, metric, Run.read(out / "best"), tuple(notes))


def _study_rows(features, configs, storage, study, sampler, trials, device, progress) -> list[dict]:
    from fusion.heads.search.optuna_study import run_study

    with progress_of(progress, "grid (optuna)", "configs") as update:
        finished = []

        def on_trial(row: dict) -> None:
            finished.append(row)
            if update:
                update(len(finished), len(configs))

        return run_study(features, configs, storage=storage, study_name=study, sampler=sampler, trials=trials,
                         on_trial=on_trial, device=device)

