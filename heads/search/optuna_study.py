"""`fusion grid --storage URL`: the same search as an Optuna study, so several machines share one grid.

Every process that runs `fusion grid --storage URL --study NAME` on the same storage pulls configurations that no
other process has taken yet (Optuna's GridSampler walks the whole grid; `--sampler tpe --trials N` samples instead).
Storage is a journal file (`journal:PATH`, fine on a shared filesystem) or any database URL Optuna accepts
(`sqlite:///grid.db`, `postgresql://...`). Optuna is an optional extra: `.venv/bin/pip install -e '.[optuna]'`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

from fusion.errors import FusionError, install_extra
from fusion.heads.config import FitConfig
from fusion.heads.search.grid import result_row
from fusion.heads.search.configs import parse_loss
from fusion.heads.train import train_head


def _optuna():
    try:
        import optuna
    except ImportError:
        raise FusionError(f"--storage needs Optuna: {install_extra('optuna')}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_storage(url: str):
    _optuna()  # one line on how to install optuna when it is missing, before its submodule import below
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return url  # Optuna opens database URLs itself


def search_space(configs: list[FitConfig]) -> dict[str, list]:
    """The grid's axes, read back from the configurations it holds."""
    axes = {"head": [], "lr": [], "dropout": [], "loss": [], "seed": []}
    for config in configs:
        for axis, value in (("head", config.head), ("lr", config.lr), ("dropout", config.dropout),
                            ("loss", config.loss_label), ("seed", config.seed)):
            if value not in axes[axis]:
                axes[axis].append(value)
    return axes


def run_study(features, configs: list[FitConfig], *, storage: str, study_name: str, sampler: str = "grid",
              trials: int | None = None, on_trial: Callable[[dict], None] | None = None, device=None) -> list[dict]:
    """Runs trials until the grid is exhausted (or `trials` are done); returns every finished trial's row."""
    optuna = _optuna()
    space = search_space(configs)
    chosen = optuna.samplers.GridSampler(space, seed=0) if sampler == "grid" else optuna.samplers.TPESampler(seed=0)
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage), sampler=chosen,
                                direction="maximize", load_if_exists=True)
    base = configs[0]

    def objective(trial) -> float:
        kind, gamma = parse_loss(trial.suggest_categorical("loss", space["loss"]))
        config = dataclasses.replace(base, head=trial.suggest_categorical("head", space["head"]),
                                     lr=trial.suggest_categorical("lr", space["lr"]),
                                     dropout=trial.suggest_categorical("dropout", space["dropout"]),
                                     seed=trial.suggest_categorical("seed", space["seed"]), loss=kind,
                                     gamma=gamma if kind == "focal" else base.gamma)
        row = result_row(train_head(features, config, device=device))
        trial.set_user_attr("row", row)
        if on_trial:
            on_trial(row)
        return row["val"][config.metric]

    if sampler != "grid" or not _grid_exhausted(study, space, optuna):
        # Optuna's GridSampler re-evaluates a point when started on an exhausted grid: don't start then.
        study.optimize(objective, n_trials=trials if sampler != "grid" else None)
    return _unique_rows(study, optuna)


def _grid_exhausted(study, space: dict[str, list], optuna) -> bool:
    finished = {tuple(trial.params[axis] for axis in space) for trial in _complete(study, optuna)}
    return len(finished) >= math.prod(len(values) for values in space.values())


def _complete(study, optuna) -> list:
    return [trial for trial in study.get_trials(deepcopy=False)
            if trial.state == optuna.trial.TrialState.COMPLETE and "row" in trial.user_attrs]


def _unique_rows(study, optuna) -> list[dict]:
    """One row per configuration: machines racing at the end of a grid can evaluate a point twice."""
    rows: dict[str, dict] = {}
    for trial in _complete(study, optuna):
        row = trial.user_attrs["row"]
        rows.setdefault(json.dumps(row["config"], sort_keys=True), row)
    return list(rows.values())
