"""`fusion grid --cache A --cache B`: the same grid on two caches of one dataset, compared on the same test rows with
bootstrap intervals; caches of other datasets or other test rows are refused before any training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from cache_fixtures import synthetic_plan, synthetic_rows, write_batches, write_synthetic_cache
from sklearn.metrics import f1_score

from fusion.cache.partial import PartialCache
from fusion.cache.writer import finalize
from fusion.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
SPLIT = (60, 30, 30)
GRID = ["--heads", "basic,text_only", "--lrs", "1e-2", "--dropouts", "0", "--losses", "ce", "--epochs", "4",
        "--seeds", "2", "--batch-size", "32"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Two caches of the same rows: a clearly separable encoder pair and a weak one (other widths too)."""
    folder = tmp_path_factory.mktemp("sweep")
    strong = write_synthetic_cache(folder / "strong.h5", SPLIT, dt=16, di=24, signal=3.0, n_skipped=0, seed=5)
    weak = write_synthetic_cache(folder / "weak.h5", SPLIT, dt=8, di=12, signal=0.3, n_skipped=0, seed=5)
    return folder, strong, weak


@pytest.fixture(scope="module")
def sweep(caches):
    folder, strong, weak = caches
    out = folder / "out"
    assert main(["grid", "--cache", str(strong), "--cache", str(weak), *GRID, "--out", str(out)]) == 0
    return out, json.loads((out / "sweep.json").read_text())


def test_each_cache_gets_its_own_grid_and_the_sweep_its_files(sweep):
    out, document = sweep
    for name in ("strong", "weak"):
        rows = json.loads((out / name / "results.json").read_text())["rows"]
        assert len(rows) == 4 and all(row["test_pred"] for row in rows)  # 2 heads x 2 seeds
    assert (out / "sweep_heads.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "](sweep_heads.png)" in report and "| strong |" in report and "| weak |" in report
    assert document["leader"] == "strong" and document["test_rows"] == SPLIT[2]


def test_intervals_score_the_chosen_configuration_on_the_test_rows(sweep):
    out, document = sweep
    for entry in document["caches"]:
        rows = json.loads((out / entry["name"] / "results.json").read_text())["rows"]
        for key, chosen in entry["chosen"].items():
            same = [row for row in rows if {k: v for k, v in row["config"].items() if k != "seed"} == chosen["config"]]
            assert key == "best" or chosen["config"]["head"] == key
            # The grid's own test metric (scikit-learn, heads/metrics.py), averaged over the seeds.
            assert chosen["test"]["value"] == pytest.approx(np.mean([row["test"]["macro_f1"] for row in same]))
            assert chosen["test"]["low"] <= chosen["test"]["value"] <= chosen["test"]["high"]


def test_differences_are_paired_on_the_same_test_rows(sweep, caches):
    out, document = sweep
    from fusion.cache.reader import read_cache

    y_true = read_cache(caches[1]).splits["test"].label
    by_name = {entry["name"]: entry for entry in document["caches"]}
    differences = {d["what"]: d for d in document["differences"]}
    assert set(differences) == {"best", "basic", "text_only"}
    for what, difference in differences.items():
        scores = []
        for name in ("strong", "weak"):
            rows = json.loads((out / name / "results.json").read_text())["rows"]
            config = by_name[name]["chosen"][what]["config"]
            predictions = [row["test_pred"] for row in rows
                           if {k: v for k, v in row["config"].items() if k != "seed"} == config]
            scores.append(np.mean([f1_score(y_true, [int(c) for c in digits], average="macro", labels=[0, 1, 2])
                                   for digits in predictions]))
        assert difference["difference"] == pytest.approx(scores[0] - scores[1])
        assert difference["low"] <= difference["difference"] <= difference["high"]
    assert differences["best"]["excludes_zero"]  # 3.0 against 0.3 signal on 30 rows: clearly apart
    # Holm across the table's three differences, by hand: the k-th smallest p (k from 0) times 3 - k, kept monotone.
    ordered = sorted(document["differences"], key=lambda d: d["p_value"])
    running = 0.0
    for k, difference in enumerate(ordered):
        running = max(running, min(1.0, (3 - k) * difference["p_value"]))
        assert difference["p_holm"] == pytest.approx(running)
        assert difference["significant"] == (difference["excludes_zero"] and running <= 0.05)
    assert differences["best"]["significant"]


def _cache_with(path, *, split=SPLIT, dataset="synthetic"):
    plan = synthetic_plan(split, seed=5)
    plan = dataclasses.replace(plan, attrs={**plan.attrs, "dataset": dataset}, fingerprint=f"{dataset}-{split}")
    rows = synthetic_rows(plan, seed=5, n_skipped=0)
    with PartialCache.open(path, plan=plan) as partial:
        write_batches(partial, rows, partial.pending())
    return finalize([partial.directory], path)


@pytest.mark.parametrize("kind, message", [("dataset", "holds dataset 'other'"),
                                           ("test ids", "test rows differ")])
def test_caches_that_cannot_be_compared_are_refused_in_one_line(caches, tmp_path, capsys, kind, message):
    _, strong, _ = caches
    other = (_cache_with(tmp_path / "other.h5", dataset="other") if kind == "dataset"
             else _cache_with(tmp_path / "other.h5", split=(60, 30, 31)))
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["grid", "--cache", str(strong), "--cache", str(other), *GRID, "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
    assert not out.exists()  # refused before any grid ran
