"""`fit` and `grid` select on each dataset's own metric: weighted F1 for MVSA, macro F1 for Memotion; the grid keeps
its test predictions, bootstrap intervals and paired comparisons in results.json and report.md."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cache_fixtures import write_synthetic_cache

from fusion.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("mvsa-single", "weighted_f1"), ("mvsa-multi", "weighted_f1"), ("memotion", "macro_f1")]


def _cache(tmp_path, dataset):
    # Weak signal and unbalanced-looking noise: the metrics disagree from epoch to epoch.
    return write_synthetic_cache(tmp_path / f"{dataset}.h5", (90, 30, 30), dt=12, di=8, seed=2, signal=0.6,
                                 dataset=dataset)


@pytest.mark.parametrize("dataset, metric", CASES)
def test_fit_selects_the_epoch_on_the_datasets_metric(tmp_path, dataset, metric):
    out = tmp_path / "run"
    assert main(["fit", "--cache", str(_cache(tmp_path, dataset)), "--head", "basic", "--lr", "1e-2", "--epochs", "8",
                 "--patience", "8", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["metric"] == metric
    scores = [entry[metric] for entry in metrics["history"]]
    assert metrics["best_epoch"] == int(np.argmax(scores)) + 1  # the first epoch with the best score
    assert metrics["val"][metric] == max(scores)
    predictions = json.loads((out / "test_predictions.json").read_text())
    assert len(predictions["ids"]) == len(predictions["y_true"]) == len(predictions["y_pred"]) > 0
    assert np.mean(np.array(predictions["y_true"]) == predictions["y_pred"]) == pytest.approx(
        metrics["test"]["accuracy"])


@pytest.mark.parametrize("dataset, metric", CASES)
def test_grid_selects_the_configuration_on_the_datasets_metric(tmp_path, dataset, metric):
    out = tmp_path / "grid"
    assert main(["grid", "--cache", str(_cache(tmp_path, dataset)), "--heads", "basic,text_only", "--lrs",
                 "1e-2,1e-3", "--dropouts", "0", "--losses", "ce", "--epochs", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == metric
    best_row = max(results["rows"], key=lambda row: row["val"][metric])
    chosen = json.loads((out / "best" / "config.json").read_text())
    assert chosen["metric"] == metric
    assert {k: chosen[k] for k in ("head", "lr", "dropout")} == {k: best_row["config"][k] for k in
                                                                 ("head", "lr", "dropout")}
    uncertainty = results["uncertainty"]
    assert uncertainty["metric"] == metric and uncertainty["best_fusion_head"] == "basic"
    assert [c["b"] for c in uncertainty["comparisons"]] == ["text_only"]
    assert all(len(row["test_pred"]) == len(results["test_labels"]["y_true"]) for row in results["rows"])
    assert main(["report", "--run", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| basic − text_only |" in report and "test, 95% CI" in report
