"""After training, as a user runs it: `fusion fit`, `fusion predict`, `fusion report`, `fusion demo`."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
from cache_fixtures import write_synthetic_cache
from dataset_writers import write_mvsa
from tiny_models import extract_argv

from fusion.cli import main
from fusion.heads.checkpoint import load_run
from fusion.labels import LABELS


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_writes_a_run_directory_and_prints_metrics(tmp_path, capsys):
    cache = write_synthetic_cache(tmp_path / "c.h5", (60, 20, 20), dt=12, di=8, seed=5)
    out = tmp_path / "run"
    assert main(["fit", "--cache", str(cache), "--head", "dual_attn", "--epochs", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "weighted F1" in printed and "F1 neutral" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for block in ("val", "test"):
        assert set(metrics[block]["per_class_f1"]) == set(LABELS)
        assert 0.0 <= metrics[block]["macro_f1"] <= 1.0
    assert 1 <= len(metrics["history"]) <= 4
    config = json.loads((out / "config.json").read_text())
    assert config["head"] == "dual_attn" and config["cache"]["fingerprint"]
    assert load_run(out).config.head == "dual_attn"


def test_fit_on_a_damaged_cache_fails_in_one_line(tmp_path, capsys):
    cache = write_synthetic_cache(tmp_path / "c.h5", (20, 6, 6), dt=12, di=8)
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    assert main(["fit", "--cache", str(cache), "--head", "basic"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(cache) in err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("run")
    expected = write_mvsa(folder / "data", kind="single", n_per_class=6, dirty=False)
    cache = folder / "c.h5"
    assert main(extract_argv(expected.root, cache, tiny_models)) == 0
    run = folder / "run"
    assert main(["fit", "--cache", str(cache), "--head", "self_attn", "--epochs", "3", "--out", str(run)]) == 0
    return expected, run


def test_predict_labels_new_posts_and_reports_unreadable_rows(trained_run, tmp_path, capsys):
    """One JSON line per post, in order; a post that failed is marked with its error there and named on stderr with
    its CSV line, and the exit code is 1 when any post failed."""
    expected, run = trained_run
    image = next((expected.root / "data").glob("*.jpg"))
    posts = tmp_path / "posts.csv"
    posts.write_text(f"image,text\n{image},what a great day\nmissing.jpg,so sad\n")
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--csv", str(posts), "--json"]) == 1
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert lines[0]["label"] in LABELS and sum(lines[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert set(lines[1]) == {"error"} and "missing" in lines[1]["error"]
    assert f"{posts}: line 3: " in captured.err and "1 of 2 posts could not be read" in captured.err


def test_predict_exits_1_when_no_post_could_be_predicted(trained_run, tmp_path, capsys):
    _, run = trained_run
    posts = tmp_path / "posts.csv"
    posts.write_text("image,text\nmissing.jpg,so sad\ngone.png,so glad\n")
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--csv", str(posts), "--json"]) == 1
    captured = capsys.readouterr()
    assert "2 of 2 posts could not be read" in captured.err
    assert all(set(json.loads(line)) == {"error"} for line in captured.out.splitlines())


def test_predict_refuses_a_run_whose_encoders_are_gone(trained_run, tmp_path, capsys):
    expected, run = trained_run
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["cache"]["text_model"] = str(tmp_path / "deleted-bert")
    (moved / "config.json").write_text(json.dumps(config))
    image = next((expected.root / "data").glob("*.jpg"))
    code = main(["predict", "--run", str(moved), "--image", str(image), "--text", "hi"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "deleted-bert" in err


def test_report_writes_figures_for_a_fit_run(trained_run, capsys):
    _, run = trained_run
    assert main(["report", "--run", str(run)]) == 0
    assert (run / "report.md").exists() and (run / "f1_per_class.png").stat().st_size > 1000
    assert "confusion_test.png" in (run / "report.md").read_text()


def test_demo_runs_end_to_end_on_a_small_synthetic_set(tmp_path, tiny_models, capsys):
    bert, dinov2 = tiny_models
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "120", "--epochs", "2", "--text-model", str(bert),
                 "--image-model", str(dinov2)]) == 0
    printed = capsys.readouterr().out
    assert "best configuration per head" in printed and "image_only" in printed
    rows = json.loads((out / "grid" / "results.json").read_text())["rows"]
    assert len(rows) == 5 * 3 * 3 * 4  # heads x lrs x dropouts x losses
    assert (out / "grid" / "report.md").exists() and (out / "grid" / "grid_heatmap.png").exists()
    # It ends with next steps; each but `serve` (which would block) runs as printed, on what the demo wrote.
    steps = [line.strip() for line in printed.split("next steps")[1].splitlines() if line.strip().startswith("fusion ")]
    commands = [shlex.split(step)[1] for step in steps]
    assert commands == ["cache", "fit", "report", "predict", "predict", "serve", "extract"]
    for step in steps:
        if " serve " not in step:
            assert main(shlex.split(step)[1:] + (["--device", "cpu"] if " predict " in step else [])) == 0, step


def test_help_shows_the_defaults_that_have_no_single_value(capsys, monkeypatch):
    """Rich read "[default: ...]" written into a help text as markup and dropped it; typer's show_default does not."""
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["fit", "--help"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "runs/CACHE-HEAD" in printed and "over half the available memory" in printed
    assert "macro F1 for Memotion" in printed
