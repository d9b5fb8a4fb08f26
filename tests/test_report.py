"""Reports: figures are real PNGs with content, report.md links them and shows published numbers only where known."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusion.errors import RunError
from fusion.app.reporting.report import PUBLISHED, Report, is_paper_encoder, write_report
from fusion.heads.search.summary import best_per_head, summarise

LABELS = ("negative", "neutral", "positive")


def metrics_block(rng: np.random.Generator, n: int = 450) -> dict:
    per_class = {name: float(rng.uniform(0.2, 0.9)) for name in LABELS}
    counts = rng.integers(0, 60, (3, 3)) + np.diag(rng.integers(40, 200, 3))
    return {"accuracy": float(rng.uniform(0.6, 0.75)), "macro_f1": float(np.mean(list(per_class.values()))),
            "weighted_f1": float(rng.uniform(0.6, 0.75)), "per_class_f1": per_class,
            "confusion_matrix": counts.tolist()}


def history(rng: np.random.Generator, epochs: int) -> list[dict]:
    entries = []
    for epoch in range(1, epochs + 1):
        rise = 1 - np.exp(-epoch / 3)
        per_class = {"negative": 0.6 * rise, "neutral": 0.25 * rise ** 3, "positive": 0.8 * rise}
        per_class = {k: float(v + rng.normal(0, 0.02)) for k, v in per_class.items()}
        entries.append({"epoch": epoch, "accuracy": 0.7 * rise, "macro_f1": float(np.mean(list(per_class.values()))),
                        "weighted_f1": 0.68 * rise, "per_class_f1": per_class,
                        "train_loss": float(1.1 * np.exp(-epoch / 4) + 0.2), "val_loss": float(0.8 + 0.01 * epoch)})
    return entries


def cache_block(dataset: str, text_model: str = "bert-base-uncased",
                image_model: str = "facebook/dinov2-small") -> dict:
    return {"path": f"/data/{dataset}.h5", "fingerprint": "ab" * 32, "dataset": dataset,
            "text_model": text_model, "image_model": image_model}


def make_run(run_dir: Path, cache: dict, seed: int = 0, head: str = "self_attn") -> Path:
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    config = {"head": head, "lr": 1e-3, "dropout": 0.2, "loss": "focal", "gamma": 2.0, "alpha": None,
              "batch_size": 64, "epochs": 30, "patience": 5, "metric": "macro_f1", "seed": seed, "cache": cache}
    metrics = {"val": metrics_block(rng), "test": metrics_block(rng), "history": history(rng, 12),
               "best_epoch": 7, "epochs_run": 12}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def make_grid(grid_dir: Path, cache: dict) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    for head in ("basic", "self_attn", "dual_attn", "text_only"):
        for lr in (1e-2, 1e-3, 1e-4):
            for dropout in (0.0, 0.2, 0.5):
                for loss, gamma in (("ce", 0.0), ("focal", 2.0)):
                    for seed in (0, 1):
                        config = {"head": head, "lr": lr, "dropout": dropout, "loss": loss, "gamma": gamma,
                                  "seed": seed}
                        rows.append({"config": config, "val": metrics_block(rng), "test": metrics_block(rng),
                                     "epochs_run": 10, "seconds": 1.5})
    grid_dir.mkdir(parents=True)
    (grid_dir / "results.json").write_text(json.dumps({"rows": rows, "metric": "macro_f1", "cache": cache}))
    make_run(grid_dir / "best", cache, seed=3, head="dual_attn")
    return grid_dir


def assert_real_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 300 and image.height > 200
        pixels = np.asarray(image.convert("L"))
    assert len(np.unique(pixels)) > 20, f"{path.name} looks blank"


def linked_images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_run_report_has_figures_and_published_numbers(tmp_path):
    run_dir = make_run(tmp_path / "run", cache_block("mvsa-single"))
    report = write_report(run_dir)
    assert isinstance(report, Report)
    assert report.markdown == run_dir / "report.md"
    assert {f.name for f in report.figures} == {"f1_per_class.png", "losses.png", "confusion_test.png"}
    text = report.markdown.read_text()
    for figure in report.figures:
        assert_real_png(figure)
    assert sorted(linked_images(text)) == sorted(f.name for f in report.figures)
    for published in PUBLISHED["mvsa-single"]:
        assert f"| {published.model} |" in text
    assert ("| Basic | 0.73 | 0.71 | F1 (kind not stated) | - | no | Seed paper (Zhao et al., arXiv:2503.07943, "
            "2025), Table 1 |") in text
    assert "not the paper's encoders" not in text
    assert "Not like for like: the published numbers used their authors' own splits" in text
    assert "shared/DATASETS.md" not in text and "Tables 1-2" not in text
    assert not list(run_dir.glob(".*.tmp"))


def test_run_report_reports_the_run_metrics(tmp_path):
    run_dir = make_run(tmp_path / "run", cache_block("mvsa-multi"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    text = write_report(run_dir).markdown.read_text()
    test = metrics["test"]
    assert f"| **this run (self_attn)** | {test['accuracy']:.4f} | {test['weighted_f1']:.4f} |" in text
    assert "| CLMLF | 0.7200 | 0.6983 | F1 (weighted) | - | no | CLMLF: Li et al., Findings of NAACL 2022" in text


def test_csv_dataset_with_other_encoders_gets_no_published_rows(tmp_path):
    cache = cache_block("csv", text_model="sentence-transformers/all-MiniLM-L6-v2", image_model="/models/tiny-vit")
    text = write_report(make_run(tmp_path / "run", cache)).markdown.read_text()
    assert "No published numbers" in text
    assert not any(f"| {p.model} |" in text for rows in PUBLISHED.values() for p in rows)
    assert "not the paper's encoders" in text
    assert "all-MiniLM-L6-v2" in text and "/models/tiny-vit" in text


def test_memotion_shows_macro_f1_only(tmp_path):
    text = write_report(make_run(tmp_path / "run", cache_block("memotion"))).markdown.read_text()
    assert ("| Dual-Attention | - | - | - | 0.3552 | no | Seed paper (Zhao et al., arXiv:2503.07943, 2025), Table 2 "
            "(§4.1.2) |") in text
    assert "| SemEval-2020 Task 8 winner | - | - | - | 0.3547 | no | IITK (Keswani et al.)" in text


def test_grid_report(tmp_path):
    grid_dir = make_grid(tmp_path / "grid", cache_block("mvsa-single", text_model="bert-base-uncased@86b5e09"))
    report = write_report(grid_dir)
    names = [f.relative_to(grid_dir).as_posix() for f in report.figures]
    assert names[0] == "grid_heatmap.png"
    assert {"best/f1_per_class.png", "best/losses.png", "best/confusion_test.png"} <= set(names)
    for figure in report.figures:
        assert_real_png(figure)
    text = report.markdown.read_text()
    assert sorted(linked_images(text)) == sorted(names)
    assert (grid_dir / "best" / "report.md").is_file()
    for head in ("basic", "self_attn", "dual_attn", "text_only"):
        assert re.search(rf"^\| {head} \| ", text, re.M), head
    assert "| **grid best (dual_attn)** |" in text
    assert "not the paper's encoders" not in text


def test_grid_best_per_head_is_the_best_seed_mean(tmp_path):
    grid_dir = make_grid(tmp_path / "grid", cache_block("csv"))
    rows = json.loads((grid_dir / "results.json").read_text())["rows"]
    basic = [r for r in rows if r["config"]["head"] == "basic"]
    means = {}
    for row in basic:
        key = (row["config"]["lr"], row["config"]["dropout"], row["config"]["loss"])
        means.setdefault(key, []).append(row["val"]["macro_f1"])
    (lr, dropout, loss), values = max(means.items(), key=lambda item: np.mean(item[1]))
    text = write_report(grid_dir).markdown.read_text()
    line = next(line for line in text.splitlines() if line.startswith("| basic |"))
    assert line.startswith(f"| basic | {lr:g} | {dropout:g} | {loss}")
    assert f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" in line


def test_missing_metrics_names_the_file(tmp_path):
    run_dir = make_run(tmp_path / "run", cache_block("csv"))
    (run_dir / "metrics.json").unlink()
    with pytest.raises(RunError, match=r"metrics\.json: missing"):
        write_report(run_dir)


def test_invalid_json_and_fields_name_the_file_and_field(tmp_path):
    run_dir = make_run(tmp_path / "run", cache_block("csv"))
    (run_dir / "config.json").write_text("{not json")
    with pytest.raises(RunError, match=r"config\.json: not valid JSON"):
        write_report(run_dir)
    run_dir = make_run(tmp_path / "run2", cache_block("csv"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["test"]["confusion_matrix"] = [[1, 2], [3, 4]]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(RunError, match=r"metrics\.json: 'test\.confusion_matrix' is not a 3x3"):
        write_report(run_dir)
    metrics["test"]["confusion_matrix"] = [[1, 2, 3]] * 3
    del metrics["history"][3]["per_class_f1"]["neutral"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(RunError, match=r"metrics\.json: 'history\[3\]\.per_class_f1\.neutral' missing"):
        write_report(run_dir)


def test_grid_without_best_run_is_refused(tmp_path):
    grid_dir = make_grid(tmp_path / "grid", cache_block("csv"))
    (grid_dir / "best" / "metrics.json").unlink()
    with pytest.raises(RunError, match=r"best/metrics\.json: missing"):
        write_report(grid_dir)


@pytest.mark.parametrize(("name", "expected"), [
    ("bert-base-uncased", True), ("google-bert/bert-base-uncased@86b5e09", True),
    ("/root/.cache/huggingface/hub/models--bert-base-uncased/snapshots/86b5e09", True),
    ("/models/bert-base-uncased/", True), ("bert-base-cased", False), ("distilbert-base-uncased", False)])
def test_paper_encoder_names(name, expected):
    assert is_paper_encoder(name, "bert-base-uncased") is expected


def _with_predictions(run_dir: Path, n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, n)
    y_pred = np.where(rng.random(n) < 0.7, y_true, rng.integers(0, 3, n))
    predictions = {"ids": [f"id{i}" for i in range(n)], "y_true": y_true.tolist(), "y_pred": y_pred.tolist()}
    (run_dir / "test_predictions.json").write_text(json.dumps(predictions))
    return y_true, y_pred


def test_run_report_gives_test_metrics_with_bootstrap_intervals(tmp_path):
    from fusion.app.reporting.stats import metric_ci

    split = {"split_source": "seeded stratified 8:1:1 (seed 0)", "split_kind": "stratified"}
    run_dir = make_run(tmp_path / "run", cache_block("mvsa-single") | split)
    y_true, y_pred = _with_predictions(run_dir)
    text = write_report(run_dir).markdown.read_text()
    cells = [f"[{metric_ci(y_true, y_pred, m).low:.4f}, {metric_ci(y_true, y_pred, m).high:.4f}]"
             for m in ("accuracy", "weighted_f1", "macro_f1")]
    assert "| test, 95% CI | " + " | ".join(cells) + " |" in text
    assert "- Splits: seeded stratified 8:1:1 (seed 0)." in text
    assert "**Memotion test" not in text
    (run_dir / "test_predictions.json").write_text(json.dumps({"y_true": [0, 1], "y_pred": [0, 5]}))
    with pytest.raises(RunError, match=r"test_predictions\.json: 'y_true' and 'y_pred' must be"):
        write_report(run_dir)


@pytest.mark.parametrize("kind, bold", [("memotion-holdout", True), ("memotion-official-test", False)])
def test_memotion_holdout_test_split_is_said_in_bold(tmp_path, kind, bold):
    cache = cache_block("memotion") | {"split_kind": kind, "split_source": "how it was split"}
    text = write_report(make_run(tmp_path / "run", cache)).markdown.read_text()
    assert ("- **Memotion test = a 10% holdout of the training pool" in text) is bold


def _holm_by_hand(p_values: list[float]) -> list[float]:
    """Holm's adjusted p-values: the k-th smallest (k from 0) times m - k, never below the one before, at most 1."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [0.0] * len(p_values), 0.0
    for k, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - k) * p_values[index]))
        adjusted[index] = running
    return adjusted


def test_grid_report_shows_intervals_and_paired_comparisons(tmp_path):
    from fusion.app.reporting.uncertainty import grid_uncertainty
    from fusion.heads.metrics import classification_metrics
    from fusion.heads.result import encode_labels

    grid_dir = make_grid(tmp_path / "grid", cache_block("mvsa-single"))
    results = json.loads((grid_dir / "results.json").read_text())
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, 3, 120)
    for row in results["rows"]:
        y_pred = np.where(rng.random(120) < 0.6, y_true, rng.integers(0, 3, 120))
        row["test_pred"], row["test"] = encode_labels(y_pred), classification_metrics(y_true, y_pred)
    labels = {"ids": None, "y_true": encode_labels(y_true)}
    results["uncertainty"] = uncertainty = grid_uncertainty(results["rows"], labels, "macro_f1", resamples=300)
    (grid_dir / "results.json").write_text(json.dumps(results))
    text = write_report(grid_dir).markdown.read_text()
    leader = uncertainty["best_fusion_head"]
    assert [c["b"] for c in uncertainty["comparisons"]] == ["text_only"] + sorted(
        {"basic", "self_attn", "dual_attn"} - {leader}, key=["basic", "self_attn", "dual_attn"].index)
    comparisons = uncertainty["comparisons"]
    holm = _holm_by_hand([c["p_value"] for c in comparisons])
    for comparison, p_holm in zip(comparisons, holm):
        assert comparison["p_holm"] == pytest.approx(p_holm)
        assert comparison["significant"] == (comparison["excludes_zero"] and p_holm <= 0.05)
        assert (f"| {leader} − {comparison['b']} | {comparison['difference']:+.4f} | "
                f"[{comparison['low']:+.4f}, {comparison['high']:+.4f}] | "
                f"{'yes' if comparison['excludes_zero'] else 'no'} | {comparison['p_value']:.3f} | {p_holm:.3f} | "
                f"{'yes' if comparison['significant'] else 'no'} |") in text
    assert f"corrects it across these {len(comparisons)} comparisons" in text
    assert "draws each head's seeds with replacement, then 120 test rows" in text
    block = uncertainty["heads"]["basic"]["test"]["accuracy"]
    assert f"{block['mean']:.4f} ± {block['sd']:.4f} [{block['low']:.4f}, {block['high']:.4f}]" in text


def test_reports_open_with_how_we_read_the_paper(tmp_path):
    from fusion.app.reporting.readings import PAPER_DOC

    run_dir = make_run(tmp_path / "run", cache_block("mvsa-single") | {"max_length": 96}, head="dual_attn")
    grid_dir = make_grid(tmp_path / "grid", cache_block("mvsa-single") | {"max_length": 96})
    for report_dir, title in ((run_dir, "# Run report: dual_attn on mvsa-single"),
                              (grid_dir, "# Grid report: mvsa-single")):
        text = write_report(report_dir).markdown.read_text()
        assert text.startswith(f"{title}\n\n## How we read the paper\n")
        block = text.split("## How we read the paper", 1)[1].split("\n## ", 1)[0]
        link = re.search(r"\[docs/paper\.md\]\(([^)]+)\)", block).group(1)
        assert (report_dir / link).resolve() == PAPER_DOC.resolve() and PAPER_DOC.is_file()
        # make_run's config: batch 64, at most 30 epochs, patience 5; its cache cut texts at 96 tokens.
        for words in ("Batch size 64", "texts cut at 96 tokens", "at most 30 epochs", "patience 5",
                      "two-token sequence [T, V]", "one hidden layer of 256 units", "focal loss without α",
                      "Dropout on the fused vector and on the hidden layer only",
                      "dual attention (Eqs. 8-10) ran on pooled features"):
            assert words in block, (title, words)


@pytest.mark.parametrize("best_epoch, epochs_run, falling, marked", [
    (30, 30, False, (True, False)), (29, 30, False, (False, False)), (12, 12, False, (False, False)),
    (7, 12, True, (False, True)), (30, 30, True, (True, True))])
def test_an_under_trained_run_says_so(tmp_path, best_epoch, epochs_run, falling, marked):
    run_dir = make_run(tmp_path / "run", cache_block("mvsa-single"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    entries = history(np.random.default_rng(0), epochs_run)
    if falling:  # the validation loss keeps falling to the last epoch
        for entry in entries:
            entry["val_loss"] = 1.0 / entry["epoch"]
    metrics.update(best_epoch=best_epoch, epochs_run=epochs_run, history=entries)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    text = write_report(run_dir).markdown.read_text()
    assert ("**Still improving at 30 epochs**" in text, "**Validation loss still falling**" in text) == marked


def test_grid_report_marks_and_counts_the_under_trained_rows(tmp_path):
    grid_dir = make_grid(tmp_path / "grid", cache_block("csv"))
    results = json.loads((grid_dir / "results.json").read_text())
    rows = results["rows"]
    for index, row in enumerate(rows):
        row["config"]["epochs"] = 30
        row["epochs_run"], row["best_epoch"] = (30, 30) if index % 3 == 0 else (10, 5)
        row["val_loss_falling"] = index % 4 == 0
    (grid_dir / "results.json").write_text(json.dumps(results))
    text = write_report(grid_dir).markdown.read_text()

    def counted(marked: list[bool]) -> str:
        by_lr = ", ".join(f"lr {lr:g}: {sum(m for r, m in zip(rows, marked) if r['config']['lr'] == lr)} of "
                          f"{sum(r['config']['lr'] == lr for r in rows)}" for lr in (1e-2, 1e-3, 1e-4))
        return f"{sum(marked)} of {len(rows)}", by_lr

    capped = [index % 3 == 0 for index in range(len(rows))]
    falling = [index % 4 == 0 for index in range(len(rows))]
    (n_capped, capped_by_lr), (n_falling, falling_by_lr) = counted(capped), counted(falling)
    assert (f"Under-training: {n_capped} runs reached the epoch cap (30 epochs) with their best validation score in "
            f"their last epoch ({capped_by_lr}); {n_falling} stopped, by patience on the validation metric or by the "
            f"cap, with their lowest validation loss in their last epoch ({falling_by_lr}).") in text

    def without_seed(row: dict) -> str:
        return json.dumps({k: v for k, v in row["config"].items() if k != "seed"}, sort_keys=True)

    cells = []
    for head, best in best_per_head(summarise(rows, "macro_f1")).items():
        line = next(line for line in text.splitlines() if line.startswith(f"| {head} | "))
        key = json.dumps(best.config, sort_keys=True)
        at_cap = sum(m for r, m in zip(rows, capped) if without_seed(r) == key)
        loss = sum(m for r, m in zip(rows, falling) if without_seed(r) == key)
        parts = ([f"still improving at 30 epochs ({at_cap} of 2 seeds)"] if at_cap else []) + (
            [f"val loss still falling ({loss} of 2 seeds)"] if loss else [])
        cells.append("; ".join(parts) or "–")
        assert line.rstrip().endswith(f"| {cells[-1]} |"), line
    assert len(set(cells)) > 1  # both a marked and an unmarked head are checked


def test_report_marks_published_rows_on_the_same_split(tmp_path):
    official = cache_block("memotion") | {"split_kind": "memotion-official-test", "split_source": "official test"}
    text = write_report(make_run(tmp_path / "official", official)).markdown.read_text()
    assert "| SemEval-2020 Task 8 winner | - | - | - | 0.3547 | yes | IITK" in text
    assert "| Dual-Attention | - | - | - | 0.3552 | no |" in text
    clmlf = cache_block("mvsa-multi") | {"split_kind": "file", "split_file": "clmlf_mvsa_multi.csv",
                                         "split_file_sha256": "ef" * 32}
    text = write_report(make_run(tmp_path / "clmlf", clmlf)).markdown.read_text()
    yes = re.findall(r"^\| ([^|*]+?) \|.*\| yes \|", text, re.M)
    assert yes == ["CLMLF", "MDSE"]
