"""Uncertainty of test metrics: a hierarchical bootstrap (training seeds, then test rows) for every interval and paired
difference, and Holm's correction across the paired comparisons of one table.

What is uncertain. A head's test figure depends on two draws: the seeds it was trained with (initial weights,
minibatch order, dropout) and the test rows. Resampling the test rows around fixed models shows only the second, so
with 3 seeds a difference could look sure while the seeds disagree by more than the difference. Here each resample
first draws, with replacement, the seeds of each model. Each model draws its own seeds, because seed 0 of one head
shares nothing with seed 0 of another. It then draws one set of test rows, and every drawn seed of every model is
scored on those rows. The rows are drawn once per resample, not once per seed. Every seed was tested on the same rows
(a crossed design, not a nested one), and a fresh draw per seed would treat each seed as if it had its own test set,
which narrows the interval. With a single seed there is nothing to draw at the seed level, and the interval is the
ordinary bootstrap over test rows.

The resampling and the interval (BCa by default, percentile on request) come from `scipy.stats.bootstrap`, used with
`paired=False`. Its samples are index arrays: the seed indices of each model with more than one seed, and the test
row indices. scipy resamples each sample on its own, and the statistic scores the drawn seeds on the drawn rows. For
one seed this gives the same draws, and the same interval, as the earlier row-only `paired=True` call. What is
written here is the metric in vectorised form (`batched_metric`: accuracy and macro and weighted F1 from per-class
counts along the last axis). scipy scores thousands of resamples in one call, while scikit-learn scores one at a
time. tests/test_stats.py checks the metric against heads/metrics.py (scikit-learn), and the intervals against a plain
loop of resamples written in the test.

Limits. With S seeds the seed level offers few distinct draws (10 for S = 3). Like any bootstrap of S values, it
understates their variance by the factor (S - 1)/S. More seeds make the interval more honest, not only narrower.

Significance. A paired difference also carries a two-sided bootstrap p-value,
p = 2 min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (B + 1), computed from the B resampled differences d*. It is about the
smallest level at which the percentile interval would leave 0 out, and it is never 0. `judge` applies Holm's
step-down correction across the comparisons of one table. It calls a difference significant only when its
hierarchical interval excludes 0 and its Holm-adjusted p is at most 1 - LEVEL. Holm is written out below, because the
library that has it (statsmodels) would be a large dependency for six lines. tests/test_stats.py checks it against
Holm's sequential rejection procedure.
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
# Resamples (and BCa's leave-one-out jackknife rows) scored at once: bounds memory at BATCH x seeds x rows per model.
BATCH = 500
METHOD = ("hierarchical bootstrap: each resample draws every model's seeds, then one set of test rows on which "
          "every drawn seed is scored (scipy.stats.bootstrap, BCa)")
HOLM = "Holm's correction across the table's paired comparisons"


@dataclass(frozen=True)
class Interval:
    value: float  # the metric (or difference) on the test rows as they are, mean over seeds
    low: float
    high: float

    def as_dict(self) -> dict:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class Difference(Interval):
    p_value: float = 1.0  # two-sided bootstrap p-value of "no difference", before any correction


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
    """`metric` on the test rows and its hierarchical bootstrap interval.

    y_pred may be (seeds, rows), one model trained with several seeds. The value is then the mean over seeds of the
    metric, and each resample draws seeds, then rows (see the module docstring)."""
    y_true, model = _labels(y_true), _predictions(y_pred, "y_pred")
    interval, _ = _hierarchical(y_true, [model], metric, lambda a: a, resamples=resamples, seed=seed, level=level,
                                method=method)
    return interval


def paired_difference(y_true, pred_a, pred_b, metric: str, *, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = LEVEL, method: str = "BCa") -> Difference:
    """metric(a) − metric(b), its hierarchical bootstrap interval and two-sided p-value. Each resample draws each
    model's seeds on its own, then scores both models on the same drawn rows. The shared rows make the interval
    reflect the models' disagreement and not the test set's difficulty twice over, and the seed draws carry each
    model's seed-to-seed spread. Either side may be (seeds, rows), as in metric_ci."""
    y_true, a, b = _labels(y_true), _predictions(pred_a, "pred_a"), _predictions(pred_b, "pred_b")
    interval, distribution = _hierarchical(y_true, [a, b], metric, lambda first, second: first - second,
                                           resamples=resamples, seed=seed, level=level, method=method)
    return Difference(interval.value, interval.low, interval.high, bootstrap_p_value(distribution))


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from resampled differences: twice the smaller tail at 0, each tail
    counted with the observed sample added (so never 0), capped at 1."""
    differences = np.asarray(differences, dtype=float)
    count = len(differences)
    below = (np.sum(differences <= 0) + 1) / (count + 1)
    above = (np.sum(differences >= 0) + 1) / (count + 1)
    return float(min(1.0, 2 * min(below, above)))


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order. The i-th smallest p (i from 0) is multiplied by
    m - i, and the running maximum keeps the order, capped at 1. H_i is rejected at level alpha iff its adjusted
    p <= alpha."""
    p_values = np.asarray(p_values, dtype=float)
    count = len(p_values)
    order = np.argsort(p_values, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate((count - np.arange(count)) * p_values[order]))
    adjusted = np.empty(count)
    adjusted[order] = stepped
    return adjusted.tolist()


def judge(differences: list[Difference], level: float = LEVEL) -> list[dict]:
    """The comparisons of one table, each as a JSON-ready dict: the difference and its interval, p and Holm's p, and
    `significant` = the interval excludes 0 AND Holm's p <= 1 - level."""
    adjusted = holm([d.p_value for d in differences])
    return [{"difference": d.value, "low": d.low, "high": d.high, "p_value": d.p_value, "p_holm": p_holm,
             "excludes_zero": d.excludes_zero(), "significant": d.excludes_zero() and p_holm <= 1 - level}
            for d, p_holm in zip(differences, adjusted)]


def seed_spread(values) -> tuple[float, float]:
    """(mean, sample standard deviation) of one figure across seeds; sd is 0 for a single seed."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _labels(values) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {values.shape}")
    return values.astype(np.int64)


def _predictions(values, name: str) -> np.ndarray:
    """(seeds, rows) labels."""
    values = np.asarray(values)
    if values.ndim not in (1, 2) or values.shape[-1] == 0 or len(values) == 0:
        raise ValueError(f"{name} must be (rows,) or (seeds, rows) labels, got shape {values.shape}")
    return np.atleast_2d(values).astype(np.int64)


def _seed_mean(y_true: np.ndarray, model: np.ndarray, seeds: np.ndarray, rows: np.ndarray, metric: str) -> np.ndarray:
    """The mean over drawn seeds (..., S) of the metric on drawn rows (..., N): the model's (..., S, N) predictions
    scored against the rows' labels."""
    predictions = model[seeds[..., :, None], rows[..., None, :]]
    truth = np.broadcast_to(y_true[rows][..., None, :], predictions.shape)
    return batched_metric(truth, predictions, metric).mean(axis=-1)


def _hierarchical(y_true: np.ndarray, models: list[np.ndarray], metric: str, combine, *, resamples: int, seed: int,
                  level: float, method: str) -> tuple[Interval, np.ndarray]:
    """The interval of combine(seed-mean metric of each model) and its bootstrap distribution. scipy resamples one
    index sample per model with several seeds, then the row indices."""
    lengths = {len(y_true), *(model.shape[1] for model in models)}
    if len(lengths) > 1:
        raise ValueError(f"labels and predictions differ in length ({', '.join(map(str, sorted(lengths)))} rows)")
    drawn = [len(model) > 1 for model in models]  # one seed: nothing to draw at the seed level
    data = tuple(np.arange(len(model)) for model, draws in zip(models, drawn) if draws) + (np.arange(len(y_true)),)

    def statistic(*samples, axis=-1):
        seed_samples, rows = iter(samples[:-1]), samples[-1]
        return combine(*(_seed_mean(y_true, model, next(seed_samples) if draws else np.zeros(1, np.int64), rows,
                                    metric) for model, draws in zip(models, drawn)))

    value = float(statistic(*data))
    if len(y_true) < 2:  # scipy needs two rows to resample; one row has no spread to show
        return Interval(value, value, value), np.full(resamples, value)
    with warnings.catch_warnings():
        # A statistic that never varies (two identical models, a perfect classifier) gives BCa nothing to
        # correct: scipy warns and returns nan, and the interval is then the value itself.
        warnings.simplefilter("ignore")
        result = bootstrap(data, statistic, n_resamples=resamples, vectorized=True, paired=False, batch=BATCH,
                           confidence_level=level, method=method, rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    distribution = result.bootstrap_distribution
    if np.isnan(low) or np.isnan(high):
        low, high = (value, value) if np.ptp(distribution) == 0 else np.quantile(
            distribution, [(1 - level) / 2, (1 + level) / 2])
    return Interval(value=value, low=float(low), high=float(high)), distribution
