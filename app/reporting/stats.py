"""Uncertainty of test metrics: bootstrap confidence intervals and paired differences over the same test rows.

The resampling and the interval come from `scipy.stats.bootstrap` (BCa by default, percentile on request), called
with `paired=True`: scipy then resamples row *indices* and hands the statistic the same rows of every array, so
(y_true, y_pred) pairs stay together and, for a paired comparison, both models are scored on the same resampled rows.
Nothing here draws resamples by hand. The one thing written here is the metric itself in vectorised form
(`batched_metric`: accuracy, macro and weighted F1 from per-class counts along the last axis), because scipy scores
thousands of resamples in one call and scikit-learn scores one at a time; tests/test_stats.py checks it against
heads/metrics.py (scikit-learn) and the intervals against a plain loop of resamples.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import bootstrap

from fusion.heads.metrics import CLASS_IDS
from fusion.paper import METRICS

# Every interval and comparison fusion reports uses these: 2,000 resamples, seed 0, 95%.
RESAMPLES, BOOTSTRAP_SEED, LEVEL = 2000, 0, 0.95
# Resamples (and BCa's leave-one-out jackknife rows) scored at once: bounds memory at BATCH x rows per array.
BATCH = 500


@dataclass(frozen=True)
class Interval:
    value: float  # the metric (or difference) on the test rows as they are
    low: float
    high: float

    def as_dict(self) -> dict:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def batched_metric(y_true, y_pred, metric: str, axis: int = -1) -> np.ndarray:
    """`metric` of each row of labels along `axis` (any leading shape), as heads/metrics.py computes it: F1 of a class
    is 2·tp / (support + predicted), 0 when both are 0; macro is the plain mean over the three classes, weighted the
    support-weighted one."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    y_true, y_pred = np.moveaxis(np.asarray(y_true), axis, -1), np.moveaxis(np.asarray(y_pred), axis, -1)
    if metric == "accuracy":
        return np.mean(y_true == y_pred, axis=-1)
    f1s, supports = [], []
    for label in CLASS_IDS:
        is_true, is_pred = y_true == label, y_pred == label
        support = is_true.sum(axis=-1)
        denominator = support + is_pred.sum(axis=-1)
        true_positive = (is_true & is_pred).sum(axis=-1)
        f1s.append(np.divide(2.0 * true_positive, denominator, out=np.zeros(denominator.shape),
                             where=denominator > 0))
        supports.append(support)
    f1, support = np.stack(f1s, axis=-1), np.stack(supports, axis=-1)
    if metric == "macro_f1":
        return f1.mean(axis=-1)
    total = support.sum(axis=-1)
    return np.divide((f1 * support).sum(axis=-1), total, out=np.zeros(total.shape), where=total > 0)


def metric_ci(y_true, y_pred, metric: str, *, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
              level: float = LEVEL, method: str = "BCa") -> Interval:
    """`metric` on the test rows and its bootstrap confidence interval (rows resampled with replacement).

    y_pred may be (seeds, rows): one model trained with several seeds. The value is then the mean over seeds of the
    metric, and each resample scores every seed on the same rows."""
    y_true, predictions = _labels(y_true), _predictions(y_pred, "y_pred")

    def statistic(truth, *preds, axis=-1):
        return _seed_mean(truth, preds, metric, axis)

    return _interval((y_true, *predictions), statistic, resamples=resamples, seed=seed, level=level, method=method)


def paired_difference(y_true, pred_a, pred_b, metric: str, *, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = LEVEL, method: str = "BCa") -> Interval:
    """metric(a) − metric(b) and its paired bootstrap interval: each resample scores both models on the same rows, so
    the interval reflects the models' disagreement, not the test set's difficulty twice over. Either side may be
    (seeds, rows), as in metric_ci: its seed-mean metric is compared."""
    y_true, a, b = _labels(y_true), _predictions(pred_a, "pred_a"), _predictions(pred_b, "pred_b")

    def statistic(truth, *preds, axis=-1):
        return _seed_mean(truth, preds[:len(a)], metric, axis) - _seed_mean(truth, preds[len(a):], metric, axis)

    return _interval((y_true, *a, *b), statistic, resamples=resamples, seed=seed, level=level, method=method)


def _seed_mean(truth, predictions, metric: str, axis: int):
    return sum(batched_metric(truth, pred, metric, axis) for pred in predictions) / len(predictions)


def seed_spread(values) -> tuple[float, float]:
    """(mean, sample standard deviation) of one figure across seeds; sd is 0 for a single seed."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _labels(values) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {values.shape}")
    return values.astype(np.int64)


def _predictions(values, name: str) -> list[np.ndarray]:
    values = np.asarray(values)
    if values.ndim not in (1, 2) or values.shape[-1] == 0 or len(values) == 0:
        raise ValueError(f"{name} must be (rows,) or (seeds, rows) labels, got shape {values.shape}")
    return list(np.atleast_2d(values).astype(np.int64))


def _interval(data: tuple, statistic, *, resamples: int, seed: int, level: float, method: str) -> Interval:
    lengths = {len(array) for array in data}
    if len(lengths) > 1:
        raise ValueError(f"labels and predictions differ in length ({', '.join(map(str, sorted(lengths)))} rows)")
    value = float(statistic(*data))
    with warnings.catch_warnings():
        # A statistic that never varies (two identical models, a perfect classifier) gives BCa nothing to
        # correct: scipy warns and returns nan, and the interval is then the value itself.
        warnings.simplefilter("ignore")
        result = bootstrap(data, statistic, n_resamples=resamples, vectorized=True, paired=True, batch=BATCH,
                           confidence_level=level, method=method, rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    if np.isnan(low) or np.isnan(high):
        distribution = result.bootstrap_distribution
        low, high = (value, value) if np.ptp(distribution) == 0 else np.quantile(
            distribution, [(1 - level) / 2, (1 + level) / 2])
    return Interval(value=value, low=float(low), high=float(high))
