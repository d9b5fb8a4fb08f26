"""Grid search over the paper's hyper-parameters, on cached embeddings.

    fusion grid --cache caches/mvsa-single.h5 --out runs/mvsa-single-grid

The default grid is the paper's: 3 heads x 4 learning rates x 3 dropouts x 4 losses = 144 configurations. Configurations
that share a head and a seed train together in one vectorised pass (`train_many`). Each finished pass is appended to
`results.jsonl` (one fsynced line per configuration), so a killed grid resumes without losing or repeating one.
Selection uses the validation metric only; the chosen configuration's test metric is reported beside it.

With `prune` (`fusion grid --prune`, heads/search/prune.py) each pass drops its worst models at the rungs. Their rows
are still written, marked with `pruned_at` (the rung epoch) and holding their best validation score until then, so
the results stay complete and the choice is made among all rows. A later exhaustive run of the same grid retrains the
pruned configurations (a pruned row is not a finished run); a pruned run keeps them.

A row that reached the epoch cap with its best validation score in its last epoch is marked `still_improving`, and a
row whose validation loss was lowest in its last epoch `val_loss_falling` (early stopping on the metric, or the cap,
ended it while the loss still fell): more epochs might have helped either (heads/search/summary.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from fusion.heads.config import FitConfig, config_from_dict
from fusion.heads.search.configs import config_key, config_key_from_row
from fusion.heads.search.prune import Pruning
from fusion.heads.search.summary import still_improving, val_loss_falling
from fusion.heads.result import FitResult, encode_labels
from fusion.heads.train import train_many

RESULTS_LOG = "results.jsonl"


def result_row(result: FitResult) -> dict:
    """test_pred: the test predictions as a digit string (result.encode_labels), for bootstrap intervals;
    still_improving, val_loss_falling: under-training, heads/search/summary.py."""
    predictions = result.test_predictions
    row = {"config": dataclasses.asdict(result.config), "val": result.val, "test": result.test,
           "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "seconds": result.seconds,
           "test_pred": None if predictions is None else encode_labels(predictions.y_pred),
           "pruned_at": result.pruned_at, "device": result.device, "calibration": result.calibration}
    return {**row, "still_improving": still_improving(row),
            "val_loss_falling": val_loss_falling(result.history, result.pruned_at)}


def read_log(path: Path) -> list[dict]:
    """Rows already finished; a torn last line (a kill during the append) is ignored and recomputed."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline, so the next append starts on a line of its own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as log:
            log.truncate(data.rfind(b"\n") + 1)
            os.fsync(log.fileno())


def append_rows(path: Path, rows: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as log:
        log.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        log.flush()
        os.fsync(log.fileno())


def pending_groups(configs: list[FitConfig], done: set[str]) -> list[list[FitConfig]]:
    """Configurations still to train, grouped by (head, seed): one vectorised pass each."""
    groups: dict[tuple[str, int], list[FitConfig]] = {}
    for config in configs:
        if config_key(config) not in done:
            groups.setdefault((config.head, config.seed), []).append(config)
    return list(groups.values())


def run_grid(features, configs: list[FitConfig], out: Path, *,
             on_pass: Callable[[int, int], None] | None = None, on_epoch=None, prune: Pruning | None = None,
             device=None) -> list[dict]:
    """Train every configuration not yet in `out/results.jsonl`; returns all rows of this grid (old and new).

    prune: successive halving inside each pass (see the module docstring); device: where to train (train_many)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / RESULTS_LOG
    drop_torn_tail(log)
    wanted = {config_key(c) for c in configs}
    rows = {config_key_from_row(r): _with_config_defaults(r) for r in read_log(log) if config_key_from_row(r) in wanted}
    done = {key for key, row in rows.items() if prune is not None or row.get("pruned_at") is None}
    groups = pending_groups(configs, done)
    if on_pass:
        on_pass(len(done), len(configs))
    for group in groups:
        started = time.perf_counter()
        results = train_many(features, group, on_epoch=on_epoch, prune=prune, device=device)
        new_rows = [result_row(result) for result in results]
        for row in new_rows:
            row["pass_seconds"] = time.perf_counter() - started
        append_rows(log, new_rows)
        rows.update((config_key_from_row(row), row) for row in new_rows)
        done.update(config_key_from_row(row) for row in new_rows)
        if on_pass:
            on_pass(len(done), len(configs))
    return [rows[config_key(c)] for c in configs]


def _with_config_defaults(row: dict) -> dict:
    """A row logged before a config field (or the still_improving flag) existed, with that field's value then
    (FitConfig's ADDED_FIELDS), so it reads like the rows written now."""
    return {**row, "config": dataclasses.asdict(config_from_dict(row["config"])),
            "still_improving": still_improving(row)}
