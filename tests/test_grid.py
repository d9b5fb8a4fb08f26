"""Grid search: the paper's grid, vectorised passes equal one-by-one training, resume, selection on validation."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
from cache_fixtures import write_synthetic_cache
from synthetic import xor_features

from fusion.cli import main
from fusion.errors import FusionError
import fusion.heads.search.grid as grid_module
from fusion.heads.checkpoint import load_run
from fusion.heads.config import FitConfig
from fusion.heads.search.grid import read_log, run_grid
from fusion.heads.search.configs import grid_configs, parse_loss
from fusion.heads.search.summary import summarise
from fusion.heads.train import train_head

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = FitConfig(epochs=4, patience=2, batch_size=32)


def test_the_default_grid_is_the_papers_144_configurations():
    configs = grid_configs(FitConfig())
    assert len(configs) == 144 == len({json.dumps(dataclasses.asdict(c), sort_keys=True) for c in configs})
    assert {c.head for c in configs} == {"basic", "self_attn", "dual_attn"}
    assert {c.lr for c in configs} == {1e-2, 1e-3, 1e-4, 1e-5} and {c.dropout for c in configs} == {0.0, 0.2, 0.5}
    assert {(c.loss, c.focal_gamma) for c in configs} == {("ce", 0.0), ("focal", 2.0), ("focal", 3.0), ("focal", 4.0)}


def test_loss_names_parse_and_bad_ones_are_refused():
    assert parse_loss("ce") == ("ce", 0.0) and parse_loss("focal3") == ("focal", 3.0)
    assert parse_loss("focal:2.5") == ("focal", 2.5)
    with pytest.raises(FusionError, match="unknown loss"):
        parse_loss("hinge")


def test_vectorised_grid_equals_training_each_configuration_alone(tmp_path):
    features = xor_features(seed=1)
    # Not lr 1e-2: 256-d heads on this task are chaotic there, so the last-bit differences between a stacked and a
    # single pass (GEMMs of other widths sum in other orders) grow into different predictions within a few epochs.
    configs = grid_configs(SMALL, heads=["self_attn"], lrs=[1e-3, 1e-4], dropouts=[0.0, 0.5], losses=["ce", "focal2"])
    rows = run_grid(features, configs, tmp_path)
    assert len(rows) == len(configs)
    for config, row in zip(configs, rows):
        alone = train_head(features, config)
        assert row["best_epoch"] == alone.best_epoch and row["epochs_run"] == alone.epochs_run
        for block, metrics in (("val", alone.val), ("test", alone.test)):
            for name in ("accuracy", "macro_f1", "weighted_f1"):
                assert row[block][name] == pytest.approx(metrics[name], abs=1e-6), (config, block, name)


def test_a_rerun_trains_only_what_is_missing_and_never_duplicates(tmp_path, monkeypatch):
    features = xor_features(seed=2)
    first = grid_configs(SMALL, heads=["basic"], lrs=[1e-2], dropouts=[0.0, 0.2], losses=["ce"])
    run_grid(features, first, tmp_path)
    trained = []
    real = grid_module.train_many
    monkeypatch.setattr(grid_module, "train_many", lambda f, cs, **kw: trained.extend(cs) or real(f, cs, **kw))
    everything = grid_configs(SMALL, heads=["basic"], lrs=[1e-2, 1e-3], dropouts=[0.0, 0.2], losses=["ce"])
    rows = run_grid(features, everything, tmp_path)
    assert sorted((c.lr, c.dropout) for c in trained) == [(1e-3, 0.0), (1e-3, 0.2)]
    assert len(rows) == 4
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4


def test_a_torn_last_log_line_is_recomputed(tmp_path):
    features = xor_features(seed=3)
    configs = grid_configs(SMALL, heads=["basic"], lrs=[1e-2], dropouts=[0.0, 0.2], losses=["ce"])
    run_grid(features, configs, tmp_path)
    log = tmp_path / "results.jsonl"
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed in the middle of the append
    rows = run_grid(features, configs, tmp_path)
    assert len(rows) == 2 and all(row["val"] for row in rows)
    assert len(read_log(log)) == 2  # the recomputed row starts a line of its own, so the next run sees it


def test_selection_uses_validation_only():
    rows = [{"config": {"head": h, "lr": 0.1, "seed": s, "loss": "ce", "gamma": 2.0},
             "val": {"macro_f1": v}, "test": {"accuracy": t, "macro_f1": t, "weighted_f1": t}}
            for h, s, v, t in [("basic", 0, 0.6, 0.1), ("basic", 1, 0.8, 0.1), ("dual_attn", 0, 0.65, 0.99),
                               ("dual_attn", 1, 0.65, 0.99)]]
    ranked = summarise(rows, "macro_f1")
    assert ranked[0].config["head"] == "basic"  # best mean val (0.70) wins despite a worse test
    assert ranked[0].val_mean == pytest.approx(0.7) and ranked[0].val_std == pytest.approx(0.1414, abs=1e-4)
    assert ranked[0].seeds == [0, 1]


@pytest.fixture()
def cache_file(tmp_path):
    return write_synthetic_cache(tmp_path / "synthetic.h5", (60, 20, 20), dt=12, di=8, seed=4)


def test_grid_command_writes_results_best_run_and_tables(cache_file, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["grid", "--cache", str(cache_file), "--heads", "basic,text_only", "--lrs", "1e-2,1e-3",
            "--dropouts", "0", "--losses", "ce,focal2", "--seeds", "2", "--epochs", "3", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "best configuration per head" in printed and "text_only" in printed
    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 * 2 * 2 * 2
    document = json.loads((out / "results.json").read_text())
    assert len(document["rows"]) == 16 and document["cache"]["fingerprint"]
    best = summarise(document["rows"], document["metric"])[0]
    loaded = load_run(out / "best")
    assert loaded.config.head == best.config["head"] and loaded.config.lr == best.config["lr"]
    assert main(argv) == 0  # a rerun finds everything done
    assert len((out / "results.jsonl").read_text().splitlines()) == 16


def test_grid_through_a_shared_optuna_journal_covers_the_grid_once(cache_file, tmp_path):
    pytest.importorskip("optuna")
    storage = f"journal:{tmp_path / 'journal.log'}"
    argv = ["grid", "--cache", str(cache_file), "--heads", "basic", "--lrs", "1e-2,1e-3", "--dropouts", "0,0.5",
            "--losses", "ce", "--epochs", "2", "--storage", storage, "--study", "s1"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0  # a second worker finds the grid exhausted
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["rows"]
    keys = [(r["config"]["lr"], r["config"]["dropout"]) for r in rows]
    assert sorted(keys) == sorted({(lr, d) for lr in (1e-2, 1e-3) for d in (0.0, 0.5)})


def test_rows_stopped_by_the_cap_while_improving_are_marked_also_when_read_back(tmp_path):
    features = xor_features(seed=3)
    # lr 1e-4 over 3 epochs keeps improving to the end; patience 1 at lr 1e-2 stops some early.
    configs = grid_configs(FitConfig(epochs=3, patience=1, batch_size=32), heads=["basic"], lrs=[1e-2, 1e-4],
                           dropouts=[0.0], losses=["ce", "focal2"])
    rows = run_grid(features, configs, tmp_path)
    # The definitions, written here: the run used every epoch the cap allowed and its best was the last one; its
    # validation loss was lowest in its last epoch (from the history of the same configuration trained alone).
    expected = [row["epochs_run"] == 3 and row["best_epoch"] == 3 for row in rows]
    assert [row["still_improving"] for row in rows] == expected and any(expected)
    histories = [train_head(features, config).history for config in configs]
    falling = [min(e["val_loss"] for e in h) == h[-1]["val_loss"] for h in histories]
    assert [row["val_loss_falling"] for row in rows] == falling and any(falling)
    logged = read_log(tmp_path / grid_module.RESULTS_LOG)
    assert [row["still_improving"] for row in logged] == expected
    # A log written before the flag existed gets it when read back.
    (tmp_path / grid_module.RESULTS_LOG).write_text("".join(
        json.dumps({k: v for k, v in row.items() if k != "still_improving"}) + "\n" for row in logged))
    assert [row["still_improving"] for row in run_grid(features, configs, tmp_path)] == expected
    for summary in summarise(rows, "macro_f1"):
        flags = [flag for row, flag in zip(rows, expected)
                 if {k: v for k, v in row["config"].items() if k != "seed"} == summary.config]
        assert summary.still_improving == sum(flags)
