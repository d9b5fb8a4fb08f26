"""How sure a grid's test numbers are: per head, the best configuration's test metrics with 95% hierarchical bootstrap
intervals (seeds, then test rows) and their mean ± sd over seeds; then the best fusion head against every other head by
a paired hierarchical bootstrap on the same test rows, Holm-corrected across those comparisons, a difference called
significant only when its interval excludes 0 and Holm agrees. The result is a JSON-ready dict that `fusion grid` and
`fusion reproduce` store in results.json and the reports print. Statistics: app/reporting/stats.py.
"""

from __future__ import annotations

import json

import numpy as np

from fusion.app.reporting.stats import (BOOTSTRAP_SEED, HOLM, LEVEL, METHOD, RESAMPLES, judge, metric_ci,
                                        paired_difference)
from fusion.heads.search.summary import Summary, best_per_head, summarise
from fusion.heads.registry import HEADS
from fusion.heads.result import decode_labels, encode_labels
from fusion.paper import METRICS

def bootstrap_rows(split) -> dict | None:
    """What a grid needs to bootstrap its test predictions: the test split's ids and labels (digit string)."""
    if split is None or len(split) == 0:
        return None
    return {"ids": getattr(split, "ids", None), "y_true": encode_labels(split.label.numpy())}


def grid_uncertainty(rows: list[dict], labels: dict | None, metric: str, *,
                     resamples: int = RESAMPLES) -> dict | None:
    """Intervals and paired comparisons for a grid's rows (labels: bootstrap_rows of its test split); None when the
    rows lack test predictions (a grid resumed from rows written before they were kept)."""
    if labels is None or not rows or any(not row.get("test_pred") for row in rows):
        return None
    y_true = decode_labels(labels["y_true"])
    best = best_per_head(summarise(rows, metric))
    predictions = {head: _seed_predictions(rows, summary) for head, summary in best.items()}
    heads = {head: _head_block(summary, y_true, predictions[head], resamples) for head, summary in best.items()}
    fusion = [head for head in best if len(HEADS[head].modalities) > 1]
    document = {"metric": metric, "level": LEVEL, "resamples": resamples, "bootstrap_seed": BOOTSTRAP_SEED,
                "method": METHOD, "correction": HOLM, "test_rows": int(len(y_true)), "heads": heads,
                "best_fusion_head": None, "comparisons": []}
    if fusion:
        leader = max(fusion, key=lambda head: best[head].val_mean)  # chosen on validation, like everything else
        document["best_fusion_head"] = leader
        others = _comparison_order(best, leader)
        differences = [paired_difference(y_true, predictions[leader], predictions[other], metric,
                                         resamples=resamples, seed=BOOTSTRAP_SEED, level=LEVEL) for other in others]
        document["comparisons"] = [{"a": leader, "b": other, "metric": metric, **judged}
                                   for other, judged in zip(others, judge(differences, LEVEL))]
    return document


def _seed_predictions(rows: list[dict], summary: Summary) -> np.ndarray:
    """(seeds, test rows) predictions of the summary's configuration, in its seeds' order."""
    wanted = json.dumps(summary.config, sort_keys=True)
    by_seed = {row["config"]["seed"]: row for row in rows
               if json.dumps({k: v for k, v in row["config"].items() if k != "seed"}, sort_keys=True) == wanted}
    return np.stack([decode_labels(by_seed[seed]["test_pred"]) for seed in summary.seeds])


def _head_block(summary: Summary, y_true: np.ndarray, predictions: np.ndarray, resamples: int) -> dict:
    test = {}
    for name in METRICS:
        interval = metric_ci(y_true, predictions, name, resamples=resamples, seed=BOOTSTRAP_SEED, level=LEVEL)
        test[name] = {"mean": interval.value, "sd": summary.test_std[name], "low": interval.low,
                      "high": interval.high}
    return {"config": summary.config, "seeds": summary.seeds, "val_mean": summary.val_mean,
            "val_sd": summary.val_std, "test": test}


def _comparison_order(best: dict[str, Summary], leader: str) -> list[str]:
    """Ablations first (the question the paper asks), then the other fusion heads."""
    others = [head for head in best if head != leader]
    return sorted(others, key=lambda head: (len(HEADS[head].modalities) > 1, list(HEADS).index(head)))
