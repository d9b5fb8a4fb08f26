"""`fusion grid --prune`: successive halving inside each vectorised pass."""

import json
import math
from dataclasses import replace

import pytest

import fusion.heads.search.grid as grid_module
from fusion.cli import main
from fusion.heads.config import FitConfig
from fusion.heads.search.grid import run_grid
from fusion.heads.search.configs import grid_configs
from fusion.heads.search.summary import summarise
from fusion.heads.search.prune import Pruning
from fusion.heads.train import train_many
from cache_fixtures import write_synthetic_cache
from synthetic import xor_features

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(proj_dim=16, hidden=16, batch_size=64)
SIZES = {"train": 400, "val": 200, "test": 200}


def test_rungs_grow_by_eta_below_the_longest_run():
    assert Pruning().rungs(30) == [2, 6, 18]
    assert Pruning().rungs(18) == [2, 6]
    assert Pruning(eta=2, first_rung=1).rungs(9) == [1, 2, 4, 8]
    assert Pruning().rungs(2) == []
    with pytest.raises(ValueError):
        Pruning(eta=1)


def test_survivors_are_the_best_third_rounded_up_ties_to_the_earlier():
    assert Pruning().survivors([0.1, 0.9, 0.5, 0.7]) == [1, 3]
    assert Pruning().survivors([0.5, 0.5, 0.5]) == [0]
    assert Pruning().survivors([0.2]) == [0]
    assert Pruning(eta=2).survivors([0.3, 0.1, 0.3, 0.4, 0.0]) == [0, 2, 3]


def _configs(epochs=20, patience=20, lrs=(3e-2, 3e-3, 3e-4, 3e-5)):
    base = FitConfig(head="self_attn", epochs=epochs, patience=patience, metric="accuracy", **FAST)
    return grid_configs(base, heads=["self_attn"], lrs=lrs, dropouts=[0.0, 0.5], losses=["ce", "focal2"])


def _still_training(result, epoch: int) -> bool:
    """Independently of the trainer: had this model's own stopping rules let it go past `epoch`?"""
    history = result.history[:epoch]
    scores = [entry[result.config.metric] for entry in history]
    best_epoch = scores.index(max(scores)) + 1
    return epoch < result.config.epochs and epoch - best_epoch < result.config.patience


def test_each_rung_keeps_the_best_third_of_the_models_still_training():
    features = xor_features(SIZES)
    configs = [replace(c, patience=4) for c in _configs()]  # some stop by themselves too
    results = train_many(features, configs, prune=Pruning())
    eta, pruned_somewhere = 3, 0
    for rung in Pruning().rungs(20):
        contenders = [i for i, r in enumerate(results) if len(r.history) >= rung
                      and (r.pruned_at is None or r.pruned_at >= rung) and _still_training(r, rung)]
        best = {i: max(e["accuracy"] for e in results[i].history[:rung]) for i in contenders}
        expected = sorted(sorted(contenders, key=lambda i: (-best[i], i))[:math.ceil(len(contenders) / eta)])
        survivors = [i for i in contenders if results[i].pruned_at is None or results[i].pruned_at > rung]
        assert survivors == expected, (rung, best)
        for i in set(contenders) - set(survivors):
            assert results[i].pruned_at == rung and results[i].epochs_run == rung
            pruned_somewhere += 1
    assert pruned_somewhere >= 10
    assert all(r.pruned_at is None for r in results if r.epochs_run > 6)


def test_a_survivor_trains_as_it_would_in_the_exhaustive_pass():
    features = xor_features(SIZES)
    # Learning rates below 3e-2, where float rounding of other GEMM widths (fewer models) cannot grow chaotically.
    configs = _configs(epochs=8, lrs=(3e-3, 1e-3, 3e-4, 1e-4))
    pruned = train_many(features, configs, prune=Pruning())
    exhaustive = train_many(features, configs)
    survivors = [i for i, r in enumerate(pruned) if r.pruned_at is None]
    assert 0 < len(survivors) < len(configs)
    for i in survivors:
        assert [e["accuracy"] for e in pruned[i].history] == [e["accuracy"] for e in exhaustive[i].history]
    for i, result in enumerate(pruned):  # a pruned model's record is the exhaustive run's, cut at its rung
        assert [e["accuracy"] for e in result.history] == [e["accuracy"] for e in
                                                           exhaustive[i].history[:result.epochs_run]]


def test_pruned_grid_picks_the_exhaustive_best_on_an_easy_task_in_fewer_epochs(tmp_path):
    """XOR: the learning rate that solves it leads from the first epochs (on a task whose best configurations are
    tied within validation noise pruning may pick another of them: benchmarks/grid_speed.py measures that)."""
    features = xor_features(SIZES, seed=5)
    configs = _configs(epochs=18, patience=6)
    exhaustive = run_grid(features, configs, tmp_path / "all")
    pruned = run_grid(features, configs, tmp_path / "pruned", prune=Pruning())
    assert len(pruned) == len(configs) and any(row["pruned_at"] for row in pruned)
    assert summarise(pruned, "accuracy")[0].config == summarise(exhaustive, "accuracy")[0].config
    assert sum(r["epochs_run"] for r in pruned) < 0.6 * sum(r["epochs_run"] for r in exhaustive)


def test_an_exhaustive_rerun_retrains_pruned_rows_and_a_pruned_rerun_does_not(tmp_path, monkeypatch):
    features = xor_features(SIZES)
    configs = _configs(epochs=4)
    first = run_grid(features, configs, tmp_path, prune=Pruning())
    pruned = [json.dumps(row["config"], sort_keys=True) for row in first if row["pruned_at"]]
    trained = []
    real = grid_module.train_many
    monkeypatch.setattr(grid_module, "train_many", lambda f, cs, **kw: trained.extend(cs) or real(f, cs, **kw))
    run_grid(features, configs, tmp_path, prune=Pruning())
    assert trained == []
    rows = run_grid(features, configs, tmp_path)
    assert sorted(json.dumps(c.__dict__, sort_keys=True) for c in trained) == sorted(pruned)
    assert all(row["pruned_at"] is None for row in rows) and len(rows) == len(configs)


@pytest.fixture()
def cache_file(tmp_path):
    return write_synthetic_cache(tmp_path / "synthetic.h5", (90, 30, 30), dt=12, di=8, seed=4)


def test_grid_prune_from_the_command_line(cache_file, tmp_path, capsys):
    out = tmp_path / "grid"
    code = main(["grid", "--cache", str(cache_file), "--heads", "basic", "--lrs", "1e-2,1e-3,1e-4",
                 "--dropouts", "0,0.5", "--losses", "ce", "--epochs", "7", "--patience", "7", "--batch-size", "32",
                 "--prune", "--device", "cpu", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 6 and [row["pruned_at"] for row in rows].count(2) == 4  # 6 -> 2 at epoch 2 -> 1 at 6
    assert [row["pruned_at"] for row in rows].count(6) == 1
    assert "pruned_at" in (out / "results.csv").read_text().splitlines()[0]
    assert json.loads((out / "grid.json").read_text())["prune"] == {"eta": 3, "first_rung": 2}
    assert "5 of 6 configurations stopped at a rung (epochs 2, 6)" in " ".join(capsys.readouterr().out.split())


def test_prune_with_a_shared_study_is_refused_in_one_line(cache_file, tmp_path, capsys):
    code = main(["grid", "--cache", str(cache_file), "--prune", "--storage", f"journal:{tmp_path / 'j'}",
                 "--out", str(tmp_path / "grid")])
    error = capsys.readouterr().err
    assert code == 1 and error.count("\n") == 1 and "--prune" in error and "--storage" in error
