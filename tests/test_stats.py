"""Bootstrap intervals (app/reporting/stats.py) against scikit-learn metrics, a plain loop of resamples, and
coverage."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from fusion.app.reporting.stats import Interval, batched_metric, metric_ci, paired_difference, seed_spread
from fusion.heads.metrics import classification_metrics

METRICS = ("accuracy", "macro_f1", "weighted_f1")


def _sklearn(metric, y_true, y_pred):
    """The metric straight from scikit-learn, written apart from heads/metrics.py and app/reporting/stats.py."""
    if metric == "accuracy":
        return accuracy_score(y_true, y_pred)
    return f1_score(y_true, y_pred, labels=[0, 1, 2], average=metric.split("_")[0], zero_division=0)


def _from_confusion(metric, y_true, y_pred):
    """The same metric from a 3x3 confusion matrix (np.bincount): fast enough to score a thousand resamples in a
    loop."""
    counts = np.bincount(3 * y_true + y_pred, minlength=9).reshape(3, 3)
    support, predicted, hits = counts.sum(axis=1), counts.sum(axis=0), np.diag(counts)
    if metric == "accuracy":
        return hits.sum() / counts.sum()
    f1 = np.array([2 * h / (s + p) if s + p else 0.0 for h, s, p in zip(hits, support, predicted)])
    return f1.mean() if metric == "macro_f1" else (f1 * support).sum() / support.sum()


def _noisy_predictions(rng, n, accuracy, classes=(0, 1, 2), weights=(0.3, 0.2, 0.5)):
    y_true = rng.choice(classes, size=n, p=weights)
    wrong = rng.random(n) > accuracy
    y_pred = np.where(wrong, rng.choice(classes, size=n), y_true)
    return y_true, y_pred


def _percentile_loop(rng, arrays, score, resamples, level=0.95):
    """An independent bootstrap: draw row indices, score the resampled rows one at a time, take the percentiles."""
    n = len(arrays[0])
    scores = []
    for _ in range(resamples):
        rows = rng.integers(0, n, n)
        scores.append(score(*(a[rows] for a in arrays)))
    return np.percentile(scores, [100 * (1 - level) / 2, 100 * (1 + level) / 2])


@pytest.mark.parametrize("metric", METRICS)
def test_batched_metric_equals_scikit_learn(metric):
    rng = np.random.default_rng(1)
    for n, classes in [(50, (0, 1, 2)), (7, (0, 2)), (30, (1,)), (1, (2,))]:
        y_true = rng.choice(classes, size=(4, n))
        y_pred = rng.choice((0, 1, 2), size=(4, n))
        batched = batched_metric(y_true, y_pred, metric)
        assert batched.shape == (4,)
        for row in range(4):
            expected = _sklearn(metric, y_true[row], y_pred[row])
            assert batched[row] == pytest.approx(expected, abs=1e-12)
            assert batched[row] == pytest.approx(classification_metrics(y_true[row], y_pred[row])[metric], abs=1e-12)


@pytest.mark.parametrize("metric", METRICS)
def test_interval_matches_a_plain_loop_of_resamples(metric):
    rng = np.random.default_rng(2)
    y_true, y_pred = _noisy_predictions(rng, 200, accuracy=0.65)
    ours = metric_ci(y_true, y_pred, metric, resamples=4000, seed=3, method="percentile")
    assert _from_confusion(metric, y_true, y_pred) == pytest.approx(_sklearn(metric, y_true, y_pred))
    low, high = _percentile_loop(rng, (y_true, y_pred), lambda t, p: _from_confusion(metric, t, p), resamples=2000)
    assert ours.value == pytest.approx(_sklearn(metric, y_true, y_pred))
    assert ours.low == pytest.approx(low, abs=0.015) and ours.high == pytest.approx(high, abs=0.015)
    assert ours.low < ours.value < ours.high
    bca = metric_ci(y_true, y_pred, metric, resamples=4000, seed=3)
    assert bca.low == pytest.approx(low, abs=0.03) and bca.high == pytest.approx(high, abs=0.03)


def test_paired_difference_matches_a_plain_loop_and_is_narrower_than_unpaired():
    rng = np.random.default_rng(4)
    y_true, pred_a = _noisy_predictions(rng, 300, accuracy=0.75)
    # b agrees with a on most rows: their difference varies far less than either metric on its own.
    pred_b = np.where(rng.random(300) < 0.1, rng.choice((0, 1, 2), size=300), pred_a)
    ours = paired_difference(y_true, pred_a, pred_b, "macro_f1", resamples=4000, seed=5, method="percentile")
    diff = lambda t, a, b: _from_confusion("macro_f1", t, a) - _from_confusion("macro_f1", t, b)  # noqa: E731
    low, high = _percentile_loop(rng, (y_true, pred_a, pred_b), diff, resamples=2000)
    assert ours.value == pytest.approx(_sklearn("macro_f1", y_true, pred_a) - _sklearn("macro_f1", y_true, pred_b))
    assert ours.low == pytest.approx(low, abs=0.01) and ours.high == pytest.approx(high, abs=0.01)
    single = metric_ci(y_true, pred_a, "macro_f1", resamples=4000, seed=5, method="percentile")
    assert ours.high - ours.low < 0.6 * (single.high - single.low)


def test_identical_models_differ_by_exactly_zero_and_clear_winners_exclude_zero():
    rng = np.random.default_rng(6)
    y_true, pred = _noisy_predictions(rng, 150, accuracy=0.6)
    assert paired_difference(y_true, pred, pred, "weighted_f1") == Interval(0.0, 0.0, 0.0)
    assert metric_ci(y_true, y_true, "accuracy") == Interval(1.0, 1.0, 1.0)
    better = paired_difference(y_true, y_true, pred, "accuracy", resamples=500)
    assert better.excludes_zero() and better.low > 0.2


def test_ninety_five_percent_intervals_cover_the_population_metric():
    """Test sets drawn from one large population: about 95% of their intervals hold the population's macro F1."""
    rng = np.random.default_rng(7)
    population_true, population_pred = _noisy_predictions(rng, 200_000, accuracy=0.6)
    truth = _sklearn("macro_f1", population_true, population_pred)
    trials, covered = 120, 0
    for trial in range(trials):
        rows = rng.integers(0, len(population_true), 300)
        interval = metric_ci(population_true[rows], population_pred[rows], "macro_f1", resamples=500, seed=trial)
        covered += interval.low <= truth <= interval.high
    assert 0.86 <= covered / trials <= 1.0, covered


def test_seed_level_and_width():
    rng = np.random.default_rng(8)
    y_true, y_pred = _noisy_predictions(rng, 120, accuracy=0.7)
    first = metric_ci(y_true, y_pred, "accuracy", resamples=300, seed=1)
    assert metric_ci(y_true, y_pred, "accuracy", resamples=300, seed=1) == first
    assert metric_ci(y_true, y_pred, "accuracy", resamples=300, seed=2) != first
    narrow = metric_ci(y_true, y_pred, "accuracy", resamples=300, seed=1, level=0.5)
    assert first.low < narrow.low < narrow.high < first.high
    more_rows = metric_ci(np.tile(y_true, 9), np.tile(y_pred, 9), "accuracy", resamples=300, seed=1)
    assert more_rows.high - more_rows.low < 0.5 * (first.high - first.low)


def test_seed_spread_and_bad_input():
    assert seed_spread([0.5, 0.7, 0.6]) == pytest.approx((0.6, 0.1))
    assert seed_spread([0.4]) == (0.4, 0.0)
    with pytest.raises(ValueError, match="unknown metric"):
        metric_ci([0, 1], [0, 1], "recall")
    with pytest.raises(ValueError, match="differ in length"):
        metric_ci([0, 1, 2], [0, 1], "accuracy")
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([0, 1], [0, 1], [0], "accuracy")
    with pytest.raises(ValueError, match="must be"):
        metric_ci([0, 1], [[[0, 1]]], "accuracy")


def test_several_seeds_give_the_seed_mean_and_resample_the_same_rows_for_each():
    rng = np.random.default_rng(9)
    y_true, first = _noisy_predictions(rng, 250, accuracy=0.7)
    seeds = np.stack([first, np.where(rng.random(250) < 0.2, rng.choice((0, 1, 2), size=250), first)])
    ours = metric_ci(y_true, seeds, "weighted_f1", resamples=3000, seed=1, method="percentile")
    assert ours.value == pytest.approx(np.mean([_sklearn("weighted_f1", y_true, p) for p in seeds]))
    mean = lambda t, a, b: (_from_confusion("weighted_f1", t, a) + _from_confusion("weighted_f1", t, b)) / 2  # noqa
    low, high = _percentile_loop(rng, (y_true, *seeds), mean, resamples=2000)
    assert ours.low == pytest.approx(low, abs=0.012) and ours.high == pytest.approx(high, abs=0.012)
    other = np.where(rng.random((3, 250)) < 0.3, rng.choice((0, 1, 2), size=(3, 250)), y_true)
    difference = paired_difference(y_true, seeds, other, "accuracy", resamples=500)
    expected = np.mean([np.mean(p == y_true) for p in seeds]) - np.mean([np.mean(p == y_true) for p in other])
    assert difference.value == pytest.approx(expected)
    assert paired_difference(y_true, seeds, seeds[::-1], "accuracy") == Interval(0.0, 0.0, 0.0)
