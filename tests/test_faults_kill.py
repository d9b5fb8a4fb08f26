"""`fusion extract` killed with SIGKILL at any moment, resumed, and compared with an uninterrupted run; two writers of
one cache. Runs the CLI in child processes (fault_helpers.CliRunner forks them from a preloaded forkserver) and once
through the real `python -m fusion.cli`. Figures for the closing note are printed at the end (pytest -s).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from dataset_writers import write_mvsa
from fault_helpers import FIGURES, CliRunner, print_figures, wait_until

from fusion.cache.info import cache_info
from fusion.cache.partial import partial_dir
from fusion.cache.reader import read_cache
from fusion.errors import CacheError

ARRAYS = ("text", "image", "label", "id", "text_tokens", "text_mask", "image_tokens")
KILLED = -signal.SIGKILL
RANDOM_KILLS = 6
GRID_KILLS = 4


@pytest.fixture(scope="module")
def runner():
    start = FIGURES.copy()
    yield CliRunner()
    print_figures(__name__, start)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # mvsa-multi with every dirty case: skipped rows, fallbacks, truncated images; ~25 rows, one per batch below.
    return write_mvsa(tmp_path_factory.mktemp("kill-data"), kind="multi", n_per_class=7, seed=4, dirty=True)


def extract_argv(dataset, out: Path, models) -> list[str]:
    bert, dinov2 = models
    return ["extract", "--dataset", "mvsa-multi", "--root", str(dataset.root), "--out", str(out), "--text-model",
            str(bert), "--image-model", str(dinov2), "--device", "cpu", "--workers", "0", "--batch-size", "1",
            "--max-length", "32", "--tokens"]


@pytest.fixture(scope="module")
def reference(runner, dataset, tiny_models, tmp_path_factory):
    """An uninterrupted run, its cache in memory, and how long a whole run takes in a child."""
    folder = tmp_path_factory.mktemp("reference")
    runner.run(["cache", "info", str(folder / "absent.h5")], log=folder / "warm.log")  # starts the forkserver
    started = time.monotonic()
    code = runner.run(extract_argv(dataset, folder / "reference.h5", tiny_models), log=folder / "run.log")
    assert code == 0, (folder / "run.log").read_text()
    return read_cache(folder / "reference.h5", tokens=True), time.monotonic() - started


def assert_same_cache(path: Path, reference) -> None:
    got = read_cache(path, tokens=True)  # raises on anything incomplete, damaged or inconsistent
    assert got.skipped == reference.skipped and got.attrs["fingerprint"] == reference.attrs["fingerprint"]
    for split, arrays in reference.splits.items():
        for name in ARRAYS:
            np.testing.assert_array_equal(getattr(got.splits[split], name), getattr(arrays, name), err_msg=name)


def phase(out: Path) -> str:
    """Where the killed run was, judged from what it left on disk."""
    if out.exists():
        return "after the final rename"
    if out.with_name(out.name + ".tmp").exists():
        return "during finalize"
    if partial_dir(out).is_dir():
        return "writing batches" if any(partial_dir(out).glob("batch-*.npz")) else "opening the partial folder"
    return "starting up"


def assert_never_looks_complete(out: Path, reference) -> None:
    """After a kill: either no final file, or one that read_cache accepts in full and that equals the reference."""
    if out.exists():
        assert_same_cache(out, reference)
        assert cache_info(out)["complete"] is True
        return
    try:
        info = cache_info(out)
    except CacheError as error:  # killed before the plan was written: nothing to report, said in one line
        assert "\n" not in str(error)
        return
    assert info["complete"] is False and info["rows_done"] <= info["rows_total"]
    with pytest.raises(CacheError):
        read_cache(out)


def assert_finished_cleanly(out: Path, reference) -> None:
    assert_same_cache(out, reference)
    assert not partial_dir(out).exists(), "the work folder outlived the finished cache"
    assert not out.with_name(out.name + ".tmp").exists()


def kill_run(runner, argv, out: Path, log: Path, wait, reference, die_at: str | None = None) -> bool:
    """Starts a run, lets `wait(child)` pick the moment (or `die_at` kill it from inside), SIGKILLs it; True when
    it really was killed rather than finished."""
    child = runner.start(argv, log=log, die_at=die_at)
    try:
        wait(child)
    finally:
        child.kill()  # multiprocessing checks first that the child has not already exited
        child.join(60)
    if child.exitcode not in (0, KILLED):
        raise AssertionError(f"run ended with {child.exitcode}: {log.read_text()}")
    killed = child.exitcode == KILLED
    if killed:
        FIGURES["kills survived"] += 1
        FIGURES[f"kills {phase(out)}"] += 1
    assert_never_looks_complete(out, reference)
    return killed


def until_exit(child) -> None:
    child.join(60)


def test_killed_at_random_moments_then_resumed_equals_an_uninterrupted_run(runner, dataset, tiny_models, reference,
                                                                        tmp_path):
    cache, whole_run = reference
    out = tmp_path / "random.h5"
    argv = extract_argv(dataset, out, tiny_models)
    rng = random.Random(20240611)
    killed = 0
    for attempt in range(30):
        if killed >= RANDOM_KILLS:
            break
        delay = rng.uniform(0.02, whole_run)  # from the fork: loading, batches, finalize, all equally likely
        was_killed = kill_run(runner, argv, out, tmp_path / f"run{attempt}.log",
                              lambda child: wait_until(lambda: False, timeout=delay, alive=child.is_alive), cache)
        killed += was_killed
        if not was_killed:  # the machine is faster now than when the reference ran: aim earlier
            whole_run *= 0.7
        if out.exists():  # that run got to the end: check it, then start again from nothing for more kills
            assert runner.run(argv, log=tmp_path / "done.log") == 0, (tmp_path / "done.log").read_text()
            assert_finished_cleanly(out, cache)
            out.unlink()
    assert killed >= RANDOM_KILLS
    assert runner.run(argv, log=tmp_path / "last.log") == 0, (tmp_path / "last.log").read_text()
    assert_finished_cleanly(out, cache)


def batch_files(out: Path) -> int:
    return len(list(partial_dir(out).glob("batch-*.npz"))) if partial_dir(out).is_dir() else 0


def test_killed_in_every_phase_including_finalize_then_resumed(runner, dataset, tiny_models, reference, tmp_path):
    cache, _ = reference
    out = tmp_path / "phases.h5"
    argv = extract_argv(dataset, out, tiny_models)
    # The real entry point first: killed as soon as its first batch is on disk.
    real = subprocess.Popen([sys.executable, "-m", "fusion.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        assert wait_until(lambda: batch_files(out) > 0, timeout=120, alive=lambda: real.poll() is None)
    finally:
        real.kill()
        _, err = real.communicate(timeout=60)
    assert real.returncode == KILLED, err
    FIGURES["kills survived"] += 1
    FIGURES[f"kills {phase(out)}"] += 1
    assert_never_looks_complete(out, cache)

    rng = random.Random(7)

    def more_batches(child):
        target = batch_files(out) + rng.randint(1, 2)
        wait_until(lambda: batch_files(out) >= target, timeout=60, alive=child.is_alive)

    steps = [  # (a moment chosen from outside, None) or (wait for the end, a death from inside)
        # The folder is there since the first kill: this one dies while starting up.
        (lambda child: wait_until(partial_dir(out).is_dir, timeout=60, alive=child.is_alive, poll=0.0002), None),
        (until_exit, "atomic_rename:2"),  # a batch file complete under its temporary name
        (more_batches, None), (more_batches, None),
        (until_exit, "atomic_rename:4"),
        (more_batches, None),
        (until_exit, "finalize_read:3"),  # the rest computed, then killed with the HDF5 temp half written
        (until_exit, "final_rename"),  # the HDF5 temp complete and fsynced, not yet renamed
        (until_exit, "cleanup"),  # renamed, the work folder not yet removed
    ]
    for attempt, (wait, die_at) in enumerate(steps):
        assert kill_run(runner, argv, out, tmp_path / f"run{attempt}.log", wait, cache, die_at=die_at)
        assert out.exists() == (die_at == "cleanup")
    # The cache is complete; this run finds it so and clears the work folder the last kill left beside it.
    assert partial_dir(out).is_dir()
    assert runner.run(argv, log=tmp_path / "last.log") == 0, (tmp_path / "last.log").read_text()
    assert "already complete" in (tmp_path / "last.log").read_text()
    assert_finished_cleanly(out, cache)


def test_a_second_writer_of_the_same_cache_is_refused_and_the_first_finishes(runner, dataset, tiny_models,
                                                                             reference, tmp_path):
    cache, _ = reference
    out, go = tmp_path / "locked.h5", tmp_path / "go"
    argv = extract_argv(dataset, out, tiny_models)
    first = runner.start(argv, log=tmp_path / "first.log", hold_after_first_batch=go)
    try:
        assert wait_until(lambda: batch_files(out) > 0, timeout=60, alive=first.is_alive), \
            (tmp_path / "first.log").read_text()
        before = sorted(p.name for p in partial_dir(out).iterdir())
        second = subprocess.run([sys.executable, "-m", "fusion.cli", *argv], capture_output=True, text=True,
                                cwd=tmp_path, timeout=180)
        after = sorted(p.name for p in partial_dir(out).iterdir())
    finally:
        go.touch()
        first.join(120)
        if first.exitcode is None:  # stuck: do not leave it behind
            first.kill()
            first.join()
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 1 and len(lines) == 1, second.stderr
    assert "another fusion process is writing" in lines[0] and str(out) in lines[0]
    assert "Traceback" not in second.stdout + second.stderr
    assert before == after, "the refused writer touched the partial folder"
    assert first.exitcode == 0, (tmp_path / "first.log").read_text()
    assert_finished_cleanly(out, cache)
    FIGURES["second writers refused"] += 1


# ---------------------------------------------------------------- fusion grid


def grid_argv(cache: Path, out: Path) -> list[str]:
    return ["grid", "--cache", str(cache), "--heads", "basic,self_attn", "--lrs", "1e-2,1e-3", "--dropouts", "0",
            "--losses", "ce,focal2", "--seeds", "2", "--epochs", "3", "--out", str(out)]


def logged_keys(out: Path) -> list[str]:
    from fusion.heads.search.grid import read_log
    from fusion.heads.search.configs import config_key_from_row

    return [config_key_from_row(row) for row in read_log(out / "results.jsonl")]


def test_grid_killed_at_random_moments_loses_and_repeats_no_configuration(runner, tmp_path):
    from cache_fixtures import write_synthetic_cache

    from fusion.heads.checkpoint import load_run
    from fusion.heads.search.configs import config_key_from_row

    cache = write_synthetic_cache(tmp_path / "c.h5", (60, 20, 20), dt=12, di=8, seed=4)
    reference_out = tmp_path / "reference"
    started = time.monotonic()
    assert runner.run(grid_argv(cache, reference_out), log=tmp_path / "reference.log") == 0
    whole_run = time.monotonic() - started
    reference = {config_key_from_row(row): row
                 for row in json.loads((reference_out / "results.json").read_text())["rows"]}
    assert len(reference) == 16

    out = tmp_path / "killed"
    rng = random.Random(99)
    killed = 0
    for attempt in range(20):
        if killed >= GRID_KILLS:
            break
        delay = rng.uniform(0.02, whole_run)
        child = runner.start(grid_argv(cache, out), log=tmp_path / f"grid{attempt}.log")
        wait_until(lambda: False, timeout=delay, alive=child.is_alive)
        child.kill()  # multiprocessing checks first that the child has not already exited
        child.join(60)
        assert child.exitcode in (0, KILLED), (tmp_path / f"grid{attempt}.log").read_text()
        if child.exitcode == KILLED:
            killed += 1
            FIGURES["grid kills survived"] += 1
        keys = logged_keys(out) if out.exists() else []
        assert len(keys) == len(set(keys)) and set(keys) <= set(reference), "a configuration logged twice"
        if child.exitcode == 0:
            whole_run *= 0.7
    assert killed >= GRID_KILLS
    assert runner.run(grid_argv(cache, out), log=tmp_path / "last.log") == 0, (tmp_path / "last.log").read_text()
    rows = json.loads((out / "results.json").read_text())["rows"]
    keys = [config_key_from_row(row) for row in rows]
    assert sorted(keys) == sorted(reference), "a configuration lost or repeated"
    for row in rows:  # vectorised passes over fewer configurations agree to float rounding
        expected = reference[config_key_from_row(row)]
        for block in ("val", "test"):
            for metric in ("accuracy", "macro_f1", "weighted_f1"):
                assert row[block][metric] == pytest.approx(expected[block][metric], abs=1e-6)
    assert len(logged_keys(out)) == len(set(logged_keys(out)))
    assert load_run(out / "best").config.head in ("basic", "self_attn")


def test_a_row_recomputed_after_a_torn_line_is_logged_durably(tmp_path):
    """Found by these tests: the row recomputed after a torn last line was appended to the fragment and lost from
    the log again (fixed in heads/search/grid.py by cutting the fragment before appending)."""
    import torch
    from synthetic import xor_features

    from fusion.heads.config import FitConfig
    from fusion.heads.search.grid import read_log, run_grid
    from fusion.heads.search.configs import grid_configs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        features = xor_features(seed=3)
        configs = grid_configs(FitConfig(epochs=2, patience=2, batch_size=32), heads=["basic"], lrs=[1e-2],
                               dropouts=[0.0, 0.2], losses=["ce"])
        run_grid(features, configs, tmp_path)
        log = tmp_path / "results.jsonl"
        first, second = log.read_text().splitlines()
        log.write_text(first + "\n" + second[: len(second) // 2])  # killed in the middle of the append
        run_grid(features, configs, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert len(read_log(log)) == 2, "the recomputed row is not in the log: the next run trains it once more"
