"""`fusion reproduce` end to end on the three datasets written in their real formats, with tiny encoders: a row per
head per dataset, intervals, paired comparisons, the paper's numbers beside ours; resumable; missing datasets
skipped. With --tokens and --split-file (tests/test_reproduce_tokens.py): both dual_attn rows, the split named."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from dataset_writers import write_memotion, write_mvsa

from fusion.app.reproduce import find_datasets
from fusion.cli import main
from fusion.heads.registry import POOLED_DUAL_ATTN_NOTE
from fusion.heads.search.summary import best_per_head, summarise

HEADS = ("basic", "self_attn", "dual_attn", "text_only", "image_only")
LABELS = {"dual_attn": "dual_attn (single-key, pooled)"}  # without --tokens dual_attn is the pooled variant only
SEED_PAPER = "Seed paper (Zhao et al., arXiv:2503.07943, 2025)"
TINY_GRID = ("--seeds", "2", "--lrs", "1e-2", "--dropouts", "0", "--losses", "ce", "--epochs", "3",
             "--resamples", "200", "--device", "cpu", "--workers", "0")


def reproduce_argv(data, out, models) -> list[str]:
    bert, dinov2 = models
    return ["reproduce", "--data", str(data), "--out", str(out), "--text-model", str(bert), "--image-model",
            str(dinov2), *TINY_GRID]


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory, tiny_models, one_thread):
    root = tmp_path_factory.mktemp("reproduce")
    data, out = root / "data", root / "out"
    write_mvsa(data, kind="single", n_per_class=20, seed=1)
    write_mvsa(data, kind="multi", n_per_class=20, seed=2)
    write_memotion(data / "memotion", n_per_class=20, seed=3)
    assert main(reproduce_argv(data, out, tiny_models)) == 0
    return data, out


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_reproduction_has_every_head_intervals_comparisons_and_the_papers_numbers(reproduction):
    _, out = reproduction
    text = (out / "reproduction.md").read_text()
    assert "Skipped:" not in text
    for title, dataset in (("MVSA-Single", "mvsa-single"), ("MVSA-Multi", "mvsa-multi"),
                           ("Memotion 7k (task A)", "memotion")):
        section = _section(text, title)
        results = json.loads((out / "grids" / dataset / "results.json").read_text())
        best = best_per_head(summarise(results["rows"], results["metric"]))
        assert set(best) == set(HEADS)
        for head in HEADS:
            summary, label = best[head], LABELS.get(head, head)
            line = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
            block = results["uncertainty"]["heads"][head]["test"]["accuracy"]
            assert (f"{summary.test['accuracy']:.4f} ± {summary.test_std['accuracy']:.4f} "
                    f"[{block['low']:.4f}, {block['high']:.4f}]") in line
            assert block["low"] <= summary.test["accuracy"] <= block["high"]
            seeds = [row["calibration"] for row in results["rows"]
                     if {k: v for k, v in row["config"].items() if k != "seed"} == summary.config]
            assert len(seeds) == 2 and line.endswith(f"| {np.mean([s['test_ece_raw'] for s in seeds]):.4f} → "
                                                     f"{np.mean([s['test_ece'] for s in seeds]):.4f} |")
            assert f"| **ours: {label}** |" in section
        assert f"Note on dual_attn (single-key, pooled): {POOLED_DUAL_ATTN_NOTE}." in section
        assert "| dual_attn |" not in section and "**ours: dual_attn**" not in section
        leader = results["uncertainty"]["best_fusion_head"]
        assert leader in ("basic", "self_attn", "dual_attn")
        for other in set(HEADS) - {leader}:
            assert re.search(rf"^\| {leader} − {other} \| [+-]\d\.\d{{4}} \| \[[+-]\d\.\d{{4}}, [+-]\d\.\d{{4}}\] \|",
                             section, re.M), (dataset, other)
        pairs = results["cache"]["duplicates"]["pairs"]  # counted by the extraction, carried into results.json
        assert set(pairs) == {"train-val", "train-test", "val-test"}
        assert "- Duplicates across splits (" in section and "They were kept" in section
        for pair, n in pairs.items():
            assert f"{pair.replace('-', '–')} {n['either']} (text {n['text']}, image {n['image']})" in section
        assert (out / "figures" / f"{dataset}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"](figures/{dataset}.png)" in section
    single, memotion = _section(text, "MVSA-Single"), _section(text, "Memotion 7k (task A)")
    seed_1, seed_2 = f"{SEED_PAPER}, Table 1", f"{SEED_PAPER}, Table 2 (§4.1.2)"
    assert f"| Basic | 0.73 | 0.71 | F1 (kind not stated) | no | {seed_1} |" in single
    assert f"| HSAN | – | 0.66 | F1 (kind not stated) | no | {seed_1} |" in single
    assert f"| Basic | 0.68 | 0.67 | F1 (kind not stated) | no | {seed_1} |" in _section(text, "MVSA-Multi")
    assert f"| Dual-Attention | 0.3552 | no | {seed_2} |" in memotion
    assert "**Memotion test = a 10% holdout" in memotion and "**Memotion test" not in single
    assert "- Splits: seeded stratified 8:1:1 (seed 0)." in single
    assert "Not like for like: the published numbers used their authors' own splits" in single
    assert "shared/DATASETS.md" not in text


def test_a_rerun_reuses_caches_and_grids_and_missing_datasets_are_skipped(reproduction, tiny_models, tmp_path,
                                                                          one_thread):
    data, out = reproduction
    caches = {path: path.stat().st_mtime_ns for path in (out / "caches").glob("*.h5")}
    logs = {path: path.read_bytes() for path in (out / "grids").glob("*/results.jsonl")}
    before = (out / "reproduction.md").read_text()
    assert main(reproduce_argv(data, out, tiny_models)) == 0
    assert {path: path.stat().st_mtime_ns for path in caches} == caches and len(caches) == 3
    assert {path: path.read_bytes() for path in logs} == logs
    assert (out / "reproduction.md").read_text() == before
    only_single = tmp_path / "only"
    only_single.mkdir()
    (only_single / "MVSA_Single").symlink_to(data / "MVSA_Single")
    unused = tmp_path / "memotion-split.csv"
    unused.write_text("image_1.jpg,test\n")
    argv = reproduce_argv(only_single, out, tiny_models) + ["--split-file", f"memotion={unused}"]
    assert main(argv) == 0  # the same cache and grid serve it
    text = (out / "reproduction.md").read_text()
    assert "## MVSA-Single" in text and "## MVSA-Multi" not in text
    assert f"- mvsa-multi: not found under {only_single}" in text
    assert f"- memotion: not found under {only_single} (looked for memotion_dataset_7k/labels.csv); its --split-file " \
           f"{unused} was not used" in text


def test_find_datasets_layouts(tmp_path):
    write_mvsa(tmp_path, kind="multi", n_per_class=4)
    write_memotion(tmp_path, n_per_class=4)
    found, skipped = find_datasets(tmp_path)
    assert found == {"mvsa-multi": tmp_path / "MVSA", "memotion": tmp_path}
    assert list(skipped) == ["mvsa-single"]
    assert find_datasets(tmp_path / "nothing")[0] == {}
