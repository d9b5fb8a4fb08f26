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
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fusion import paper
from fusion.errors import FusionError
from fusion.heads.config import FitConfig, config_from_dict
from fusion.heads.search.prune import Pruning
from fusion.heads.result import FitResult, encode_labels
from fusion.heads.train import train_many

RESULTS_LOG = "results.jsonl"


def parse_loss(name: str) -> tuple[str, float]:
    """'ce' -> cross-entropy; 'focal2' or 'focal:2.5' -> focal loss with that gamma."""
    if name == "ce":
        return "ce", 0.0
    match = re.fullmatch(r"focal:?([0-9]*\.?[0-9]+)", name)
    if not match:
        raise FusionError(f"unknown loss {name!r}: use ce, or focal with a gamma such as focal2 or focal:2.5")
    return "focal", float(match.group(1))


def grid_configs(base: FitConfig, *, heads: Iterable[str] = paper.HEADS, lrs: Iterable[float] = paper.LRS,
                 dropouts: Iterable[float] = paper.DROPOUTS, losses: Iterable[str] = paper.LOSSES,
                 seeds: Iterable[int] = (0,)) -> list[FitConfig]:
    configs = []
    for head, lr, dropout, loss, seed in itertools.product(heads, lrs, dropouts, losses, seeds):
        kind, gamma = parse_loss(loss)
        configs.append(dataclasses.replace(base, head=head, lr=float(lr), dropout=float(dropout), loss=kind,
                                           gamma=gamma if kind == "focal" else base.gamma, seed=int(seed)))
    return configs


def config_key(config: FitConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def result_row(result: FitResult) -> dict:
    """test_pred: the test predictions as a digit string (result.encode_labels), for bootstrap intervals."""
    predictions = result.test_predictions
    return {"config": dataclasses.asdict(result.config), "val": result.val, "test": result.test,
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "seconds": result.seconds,
            "test_pred": None if predictions is None else encode_labels(predictions.y_pred),
            "pruned_at": result.pruned_at, "device": result.device}


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
    """A row logged before a config field existed, with that field's value then (FitConfig's ADDED_FIELDS), so
    it reads like the rows written now."""
    return {**row, "config": dataclasses.asdict(config_from_dict(row["config"]))}


def config_key_from_row(row: dict) -> str:
    return config_key(FitConfig(**{k: tuple(v) if k == "alpha" and v is not None else v
                                   for k, v in row["config"].items()}))


@dataclass(frozen=True)
class Summary:
    """One configuration over its seeds: the mean and spread of the validation metric, and test metrics beside."""
    config: dict
    seeds: list[int]
    val_mean: float
    val_std: float
    test: dict[str, float]
    test_std: dict[str, float]


def summarise(rows: list[dict], metric: str) -> list[Summary]:
    """Configurations ranked by mean validation metric (best first); the test metrics never enter the ranking."""
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        without_seed = {k: v for k, v in row["config"].items() if k != "seed"}
        grouped.setdefault(json.dumps(without_seed, sort_keys=True), []).append(row)
    summaries = [_summary(group, metric) for group in grouped.values()]
    return sorted(summaries, key=lambda s: s.val_mean, reverse=True)


def _summary(group: list[dict], metric: str) -> Summary:
    vals = [row["val"][metric] for row in group]
    tests = {key: [row["test"][key] for row in group] for key in paper.METRICS}
    config = {k: v for k, v in group[0]["config"].items() if k != "seed"}
    return Summary(config=config, seeds=[row["config"]["seed"] for row in group], val_mean=statistics.fmean(vals),
                   val_std=_std(vals), test={k: statistics.fmean(v) for k, v in tests.items()},
                   test_std={k: _std(v) for k, v in tests.items()})


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def best_per_head(summaries: list[Summary]) -> dict[str, Summary]:
    best: dict[str, Summary] = {}
    for summary in summaries:  # already sorted best first
        best.setdefault(summary.config["head"], summary)
    return best
