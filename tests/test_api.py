"""The public API (fusion/__init__.py, app/api.py) and the CLI over it give the same numbers: the same cache, the
same fit metrics, the same grid rows, the same predictions; `import fusion` stays free of torch."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from dataset_writers import write_mvsa
from PIL import Image
from tiny_models import extract_argv

import fusion
from fusion.cache.reader import read_cache
from fusion.cli import main
from fusion.labels import LABELS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_models):
    """One tiny MVSA-Single folder, extracted once through the API and once through the CLI."""
    folder = tmp_path_factory.mktemp("api")
    expected = write_mvsa(folder / "data", kind="single", n_per_class=6, dirty=False)
    bert, dinov2 = tiny_models
    cache = fusion.extract(dataset="mvsa-single", root=expected.root, out=folder / "api.h5", text_model=str(bert),
                           image_model=str(dinov2), device="cpu", workers=0)
    assert main(extract_argv(expected.root, folder / "cli.h5", tiny_models)) == 0
    return folder, expected, cache


def test_extract_returns_the_cache_the_cli_writes(made):
    folder, _, cache = made
    by_cli = fusion.open_cache(folder / "cli.h5")
    assert isinstance(cache, fusion.Cache) and cache.path == folder / "api.h5"
    assert cache.fingerprint == by_cli.fingerprint and cache.dataset == "mvsa-single"
    assert cache.splits == by_cli.splits and sum(cache.splits.values()) == 18
    assert (cache.text_dim, cache.image_dim) == (32, 24)
    assert cache.extraction.rows_computed == 18 and by_cli.extraction is None
    assert {key: cache.info[key] for key in ("text_pooling", "image_pooling", "device_type", "split_kind")} == {
        "text_pooling": "cls", "image_pooling": "cls_layernorm", "device_type": "cpu", "split_kind": "stratified"}
    stored = read_cache(folder / "cli.h5").splits["train"]
    train = cache.features("train")
    np.testing.assert_array_equal(train.text, stored.text)
    np.testing.assert_array_equal(train.image, stored.image)
    assert train.text.shape == (cache.splits["train"], 32) and list(train.id) == list(stored.id)
    assert set(train.label.tolist()) <= {0, 1, 2}
    with pytest.raises(KeyError, match="no split 'dev'"):
        cache.features("dev")


def test_fit_gives_the_metrics_the_cli_writes(made, tmp_path, capsys):
    folder, _, cache = made
    run = fusion.fit(cache, head="dual_attn", lr=1e-2, dropout=0.0, loss="ce", epochs=3, seed=1, batch_size=8,
                     out=tmp_path / "api-run")
    assert main(["fit", "--cache", str(folder / "api.h5"), "--head", "dual_attn", "--lr", "1e-2", "--dropout", "0",
                 "--loss", "ce", "--epochs", "3", "--seed", "1", "--batch-size", "8",
                 "--out", str(tmp_path / "cli-run")]) == 0
    by_cli = json.loads((tmp_path / "cli-run" / "metrics.json").read_text())
    assert isinstance(run, fusion.Run) and run.path == tmp_path / "api-run"
    for block in ("val", "test"):
        assert run.metrics[block] == by_cli[block]  # the same floats, not just close
    assert [entry["macro_f1"] for entry in run.history] == [entry["macro_f1"] for entry in by_cli["history"]]
    assert run.config["head"] == "dual_attn" and run.config["metric"] == "weighted_f1"  # MVSA's own metric
    assert any("single-key" in note for note in run.notes)  # dual_attn on pooled features says what it is
    assert "single-key" in capsys.readouterr().out


def test_fit_defaults_are_the_cli_defaults(made, tmp_path):
    folder, _, cache = made
    run = fusion.fit(cache, epochs=2, out=tmp_path / "api")
    assert main(["fit", "--cache", str(folder / "api.h5"), "--epochs", "2", "--out", str(tmp_path / "cli")]) == 0
    by_cli = json.loads((tmp_path / "cli" / "config.json").read_text())
    keys = ("head", "lr", "dropout", "loss", "gamma", "batch_size", "patience", "seed", "precision", "metric")
    assert {key: run.config[key] for key in keys} == {key: by_cli[key] for key in keys}
    assert run.metrics["test"] == json.loads((tmp_path / "cli" / "metrics.json").read_text())["test"]


def test_grid_returns_the_rows_of_results_json_and_the_best_run(made, tmp_path):
    folder, _, cache = made
    grid = fusion.grid(cache, heads=["basic", "self_attn"], lrs=[1e-2, 1e-3], dropouts=[0.0], losses=["ce"],
                       epochs=2, out=tmp_path / "api-grid")
    assert main(["grid", "--cache", str(folder / "api.h5"), "--heads", "basic,self_attn", "--lrs", "1e-2,1e-3",
                 "--dropouts", "0", "--losses", "ce", "--epochs", "2", "--out", str(tmp_path / "cli-grid")]) == 0
    written = json.loads((tmp_path / "api-grid" / "results.json").read_text())
    by_cli = json.loads((tmp_path / "cli-grid" / "results.json").read_text())
    assert isinstance(grid, fusion.GridResult) and grid.path == tmp_path / "api-grid" and len(grid.rows) == 4
    assert [row["val"] for row in grid.rows] == [row["val"] for row in written["rows"]]
    assert [row["test"] for row in grid.rows] == [row["test"] for row in by_cli["rows"]]
    assert grid.best.path == tmp_path / "api-grid" / "best" and grid.best.config["head"] == \
        grid.summaries[0].config["head"]
    best_by_cli = json.loads((tmp_path / "cli-grid" / "best" / "metrics.json").read_text())
    assert grid.best.metrics["test"] == best_by_cli["test"]


def test_predict_gives_what_fusion_predict_prints_for_paths_bytes_and_images(made, tmp_path, capsys):
    folder, expected, cache = made
    run = fusion.fit(cache, head="self_attn", epochs=2, out=tmp_path / "run")
    images = sorted((expected.root / "data").glob("*.jpg"))[:3]
    texts = [expected.texts[path.stem] for path in images]
    posts = tmp_path / "posts.csv"
    posts.write_text("image,text\n" + "".join(f"{path},{text}\n" for path, text in zip(images, texts)))
    capsys.readouterr()
    assert main(["predict", "--run", str(run.path), "--csv", str(posts), "--json", "--device", "cpu"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    predictor = fusion.load_run(run.path, device="cpu")
    assert isinstance(predictor, fusion.Predictor)
    assert predictor.predict(images, texts) == printed  # the same objects, floats and all
    as_bytes = [path.read_bytes() for path in images]
    as_pil = [Image.open(io.BytesIO(data)) for data in as_bytes]
    assert predictor.predict(as_bytes, texts) == printed and predictor.predict(as_pil, texts) == printed
    assert all(set(answer) == {"label", "probabilities", "calibration"} and answer["calibration"] == "calibrated"
               and list(answer["probabilities"]) == list(LABELS) for answer in printed)
    capsys.readouterr()
    assert main(["predict", "--run", str(run.path), "--csv", str(posts), "--json", "--explain", "--raw",
                 "--device", "cpu"]) == 0
    explained = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert predictor.predict(images, texts, explain=True, raw=True) == explained


def test_predict_marks_an_unreadable_image_in_place_of_its_label(made, tmp_path):
    _, expected, cache = made
    run = fusion.fit(cache, head="basic", epochs=1, out=tmp_path / "run")
    image = sorted((expected.root / "data").glob("*.jpg"))[0]
    answers = fusion.load_run(run.path, device="cpu").predict([image, b"not an image", tmp_path / "gone.jpg"],
                                                              ["a", "b", "c"])
    assert "label" in answers[0]
    assert answers[1] == {"error": "image: not an image (cannot identify image file)"}
    assert set(answers[2]) == {"error"} and "gone.jpg" in answers[2]["error"] and "missing" in answers[2]["error"]


def test_report_returns_what_it_wrote(made, tmp_path):
    _, _, cache = made
    run = fusion.fit(cache, head="basic", epochs=2, out=tmp_path / "run")
    written = fusion.report(run.path)
    assert written.markdown == tmp_path / "run" / "report.md" and written.markdown.is_file()
    assert written.figures and all(figure.is_file() for figure in written.figures)


def test_import_fusion_loads_no_torch_and_names_the_api():
    code = ("import sys, fusion; assert callable(fusion.extract) and callable(fusion.fit); "
            "print(sorted(m for m in ('torch', 'transformers', 'h5py') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert {"extract", "open_cache", "fit", "grid", "load_run", "report", "reproduce"} <= set(dir(fusion))
