"""Calibrated probabilities: the temperature fitted on validation (it lowers the NLL of an overconfident head and
never changes a label), stored with every run and grid row; ECE checked against a plain computation written here;
report.md's ECE before and after with the reliability diagram; old runs load and say "uncalibrated"."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from cache_fixtures import write_synthetic_cache
from dataset_writers import write_mvsa
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import gaussian_features
from tiny_models import extract_argv

import fusion
from fusion.cli import main
from fusion.errors import RunError
from fusion.heads.checkpoint import load_run
from fusion.heads.config import FitConfig
from fusion.heads.models import build_head
from fusion.heads.posthoc.calibration import (TEMPERATURE_RANGE, calibrated, expected_calibration_error,
                                              fit_temperatures, nll)
from fusion.heads.train import train_head
from fusion.labels import LABELS

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_ece(probabilities, labels, bins: int = 15) -> float:
    """ECE written out: for each bin (lo, hi] of the top probability, its rows' share times |accuracy - confidence|."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    total, n = 0.0, len(labels)
    for low, high in zip(edges[:-1], edges[1:]):
        rows = [i for i in range(n) if low < max(probabilities[i]) <= high]
        if not rows:
            continue
        accuracy = sum(int(np.argmax(probabilities[i]) == labels[i]) for i in rows) / len(rows)
        confidence = sum(max(probabilities[i]) for i in rows) / len(rows)
        total += len(rows) / n * abs(accuracy - confidence)
    return total


def test_ece_is_the_plain_computation_edges_included():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet([0.6, 0.6, 0.6], size=500)
    labels = rng.integers(0, 3, size=500)
    labels[:300] = probabilities[:300].argmax(axis=1)  # better than chance, so the bins differ
    edges = np.linspace(0.0, 1.0, 16)
    for row, edge in zip(range(500, 510), edges[6:16]):  # top probabilities exactly on the bins' edges
        remainder = (1 - edge) / 2
        probabilities = np.vstack([probabilities, [edge, remainder, remainder]])
        labels = np.append(labels, row % 3)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(plain_ece(probabilities, labels),
                                                                              abs=1e-12)
    perfect = np.eye(3)[labels]
    assert expected_calibration_error(perfect, labels) == 0.0


def test_the_temperature_lowers_the_validation_nll_of_an_overconfident_head():
    features = gaussian_features({"train": 600, "val": 300, "test": 300}, separation=1.0)[0]
    result = train_head(features, FitConfig(head="basic", epochs=8, proj_dim=16, hidden=16, batch_size=64))
    head = build_head(result.config, 4, 4, params=result.state_dict).eval()
    labels = features["val"].label
    with torch.no_grad():
        [own] = fit_temperatures(head(features["val"].text, features["val"].image)[None], labels).tolist()
        head.classifier.out.weight *= 6 / own  # every logit 6 / T further apart than the fitted head's: far too sure
        head.classifier.out.bias *= 6 / own
        logits = head(features["val"].text, features["val"].image)
    [temperature] = fit_temperatures(logits[None], labels).tolist()
    assert temperature == pytest.approx(6, rel=1e-3)  # it undoes the stretch exactly
    assert float(nll(logits, labels, temperature)) < 0.8 * float(nll(logits, labels))
    # LBFGS found the minimum: no temperature on a fine grid does better.
    grid = np.exp(np.linspace(np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1]), 2001))
    best = min(float(nll(logits.double(), labels, float(t))) for t in grid)
    assert float(nll(logits.double(), labels, temperature)) <= best + 1e-6


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=3, max_size=3), st.floats(*TEMPERATURE_RANGE))
def test_calibration_never_changes_the_label(logits, temperature):
    logits = torch.tensor(logits, dtype=torch.float32)
    raw, scaled = calibrated(logits, None), calibrated(logits, temperature)
    winners = (raw == raw.max()).nonzero().flatten().tolist()
    assert int(scaled.argmax()) in winners  # ties aside, the same label
    assert float(scaled.sum()) == pytest.approx(1, abs=1e-5)


def test_a_diverged_head_keeps_temperature_1():
    logits = torch.tensor([[[float("nan"), 0.0, 1.0]] * 4, [[2.0, 0.0, -1.0]] * 4])
    temperatures = fit_temperatures(logits, torch.tensor([0, 1, 2, 0]))
    assert float(temperatures[0]) == 1.0 and torch.isfinite(temperatures).all()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("calibration") / "c.h5", (240, 120, 120), signal=0.5)


def test_fit_and_grid_store_a_temperature_in_every_run_and_row(cache, tmp_path):
    run = fusion.fit(cache, head="self_attn", epochs=4, out=tmp_path / "fit")
    grid = fusion.grid(cache, heads=["basic", "dual_attn"], lrs=[1e-2, 1e-3], dropouts=[0.0], losses=["ce"], epochs=3,
                       out=tmp_path / "grid")
    for folder in (run.path, grid.best.path):
        config = json.loads((folder / "config.json").read_text())
        block = json.loads((folder / "metrics.json").read_text())["calibration"]
        assert config["temperature"] == block["temperature"] and config["temperature"] > 0
        assert block["val_nll"] <= block["val_nll_raw"] + 1e-6  # T = 1 is where LBFGS starts
        assert load_run(folder).temperature == config["temperature"]
    rows = json.loads((tmp_path / "grid" / "results.json").read_text())["rows"]
    assert len(rows) == 4 and all(row["calibration"]["temperature"] > 0 for row in rows)
    assert all(0 <= row["calibration"]["test_ece"] <= 1 for row in rows)


def test_report_shows_the_test_ece_before_and_after_with_the_reliability_diagram(cache, tmp_path):
    run = fusion.fit(cache, head="basic", epochs=6, lr=3e-3, out=tmp_path / "run")
    report = fusion.report(run.path)
    text = report.markdown.read_text()
    stored = json.loads((run.path / "test_predictions.json").read_text())
    temperature = json.loads((run.path / "config.json").read_text())["temperature"]
    logits = np.asarray(stored["logits"], dtype=np.float64)
    raw = np.exp(logits - logits.max(axis=1, keepdims=True))
    raw /= raw.sum(axis=1, keepdims=True)
    scaled = np.exp((logits - logits.max(axis=1, keepdims=True)) / temperature)
    scaled /= scaled.sum(axis=1, keepdims=True)
    assert (raw.argmax(axis=1) == np.asarray(stored["y_pred"])).all()  # the logits the test predictions came from
    section = text.split("## Calibration (test)\n", 1)[1].split("\n## ", 1)[0]
    assert "| raw (the head's softmax) | 1 |" in section
    rows = {line.split(" | ")[0]: line for line in section.splitlines() if line.startswith("| ")}
    assert rows["| raw (the head's softmax)"].endswith(f"| {plain_ece(raw, stored['y_true']):.4f} |")
    assert rows["| calibrated (default of predict and serve)"].endswith(
        f"| {plain_ece(scaled, stored['y_true']):.4f} |")
    assert f"| {temperature:.4f} |" in rows["| calibrated (default of predict and serve)"]
    figure = run.path / "reliability_test.png"
    assert figure in report.figures and figure.read_bytes()[:4] == b"\x89PNG"
    assert "](reliability_test.png)" in text


# ---------- through the Predictor ----------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("tiny")
    expected = write_mvsa(folder / "data", kind="single", n_per_class=8, dirty=False)
    assert main(extract_argv(expected.root, folder / "c.h5", tiny_models)) == 0
    run = fusion.fit(folder / "c.h5", head="self_attn", epochs=4, lr=1e-2, out=folder / "run")
    images = sorted(path for path in (expected.root / "data").glob("*.jpg") if path.stem in expected.texts)
    return run.path, images, [expected.texts[path.stem] for path in images]


def _matrix(answers: list[dict]) -> torch.Tensor:
    return torch.tensor([[answer["probabilities"][name] for name in LABELS] for answer in answers],
                        dtype=torch.float64)


def test_predict_is_calibrated_by_default_raw_on_request_and_the_labels_agree(tiny_run, capsys):
    run, images, texts = tiny_run
    predictor = fusion.load_run(run, device="cpu")
    temperature = predictor.temperature
    assert temperature is not None and temperature != pytest.approx(1.0)
    default, raw = predictor.predict(images, texts), predictor.predict(images, texts, raw=True)
    assert {answer["calibration"] for answer in default} == {"calibrated"}
    assert {answer["calibration"] for answer in raw} == {"raw"}
    assert [answer["label"] for answer in default] == [answer["label"] for answer in raw]
    # softmax(log p / T) is softmax(z / T): the logits' common shift cancels.
    expected = torch.softmax(torch.log(_matrix(raw)) / temperature, dim=-1)
    torch.testing.assert_close(_matrix(default), expected, atol=1e-5, rtol=0)
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--image", str(images[0]), "--text", texts[0], "--raw", "--json",
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == predictor.predict(images[:1], texts[:1], raw=True)[0]


def test_a_run_written_before_temperatures_loads_and_says_uncalibrated(tiny_run, tmp_path, capsys):
    source, images, texts = tiny_run
    old = shutil.copytree(source, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    for key in ("temperature", "train_means_sha256"):
        del config[key]
    (old / "config.json").write_text(json.dumps(config))
    (old / "train_means.safetensors").unlink()
    predictions = json.loads((old / "test_predictions.json").read_text())
    del predictions["logits"]
    (old / "test_predictions.json").write_text(json.dumps(predictions))
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["calibration"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    predictor = fusion.load_run(old, device="cpu")
    assert predictor.temperature is None and predictor.describe()["calibration"] == "uncalibrated"
    answers = predictor.predict(images[:3], texts[:3], explain=True)
    assert {answer["calibration"] for answer in answers} == {"uncalibrated"}
    torch.testing.assert_close(_matrix(answers), _matrix(predictor.predict(images[:3], texts[:3], raw=True)))
    assert all("fit it again" in answer["explanation"]["note"] for answer in answers)
    assert "Uncalibrated: this run was written before" in fusion.report(old).markdown.read_text()
    capsys.readouterr()
    assert main(["predict", "--run", str(old), "--image", str(images[0]), "--text", texts[0], "--device", "cpu"]) == 0
    assert "uncalibrated" in capsys.readouterr().out


@pytest.mark.parametrize("value", [0, -1.5, "warm", True])
def test_a_temperature_that_is_not_a_positive_number_is_refused_in_one_line(tiny_run, tmp_path, value):
    run = shutil.copytree(tiny_run[0], tmp_path / "bad")
    config = json.loads((run / "config.json").read_text())
    config["temperature"] = value
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunError) as raised:
        load_run(run)
    assert len(str(raised.value).splitlines()) == 1 and "temperature" in str(raised.value)


def test_an_altered_means_file_is_refused(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run[0], tmp_path / "altered")
    data = bytearray((run / "train_means.safetensors").read_bytes())
    data[-1] ^= 1
    (run / "train_means.safetensors").write_bytes(bytes(data))
    with pytest.raises(RunError, match="train_means.safetensors: altered or replaced"):
        load_run(run)
