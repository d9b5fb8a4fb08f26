"""A grid's rows summarised: each configuration over its seeds, ranked on validation only."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

from fusion import paper


@dataclass(frozen=True)
class Summary:
    """One configuration over its seeds: the mean and spread of the validation metric, and test metrics beside."""
    config: dict
    seeds: list[int]
    val_mean: float
    val_std: float
    test: dict[str, float]
    test_std: dict[str, float]
    still_improving: int = 0  # seeds whose run reached the epoch cap while still improving (`still_improving`)
    loss_falling: int = 0  # seeds whose validation loss still fell when training stopped (`val_loss_falling`)


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
                   test_std={k: _std(v) for k, v in tests.items()},
                   still_improving=sum(still_improving(row) for row in group),
                   loss_falling=sum(row.get("val_loss_falling") is True for row in group))


def still_improving(row: dict) -> bool:
    """A row stopped by the epoch cap while its validation metric was still improving: its best epoch was the last
    one and that was the cap (a pruned row stopped at a rung, not the cap). Derived from the row's own fields, so
    rows logged before heads/search/grid.py recorded the flag get it too; a row without them is not marked."""
    epochs, best, cap = row.get("epochs_run"), row.get("best_epoch"), row["config"].get("epochs")
    return None not in (epochs, best, cap) and row.get("pruned_at") is None and epochs >= cap and best == epochs


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def best_per_head(summaries: list[Summary]) -> dict[str, Summary]:
    best: dict[str, Summary] = {}
    for summary in summaries:  # already sorted best first
        best.setdefault(summary.config["head"], summary)
    return best


def val_loss_falling(history: list[dict], pruned_at: int | None = None) -> bool:
    """The run's lowest validation loss came in its last epoch: whatever stopped it (patience on the validation
    metric, or the cap) stopped it while the loss still fell. A flat metric with a falling loss is the under-training
    that `still_improving` cannot see; a pruned run stopped at a rung and is not marked."""
    losses = [entry["val_loss"] for entry in history if isinstance(entry.get("val_loss"), (int, float))]
    return pruned_at is None and len(losses) == len(history) > 0 and losses[-1] <= min(losses)
