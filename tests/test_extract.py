"""Stage 1 end to end: real on-disk formats -> `fusion extract` (tiny real-architecture encoders) -> HDF5 cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dataset_writers import write_generic_csv, write_memotion, write_mvsa
from tiny_models import extract_argv
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from fusion.cache.reader import read_cache
from fusion.cli import main
from fusion.extract.images import load_rgb
from fusion.extract.pipeline import ExtractConfig, extract
from fusion.labels import LABELS


def run_extract(root, out, models, *extra: str, dataset="mvsa-single") -> int:
    return main(extract_argv(root, out, models, "--batch-size", "3", *extra, dataset=dataset))


@pytest.fixture(scope="module")
def mvsa_cache(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("mvsa")
    expected = write_mvsa(folder / "data", kind="single", n_per_class=5, seed=3, dirty=True)
    out = folder / "cache.h5"
    assert run_extract(expected.root, out, tiny_models, "--tokens") == 0
    return expected, out


def direct_forward(models, text: str, image_path, max_length: int = 128):
    """The embeddings computed straight with transformers, one sample at a time, no padding."""
    bert, dinov2 = models
    tokenizer, text_model = AutoTokenizer.from_pretrained(bert), AutoModel.from_pretrained(bert).eval()
    processor = AutoImageProcessor.from_pretrained(dinov2, backend="pil")
    image_model = AutoModel.from_pretrained(dinov2).eval()
    with torch.inference_mode():
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        text_hidden = text_model(**encoded).last_hidden_state[0]
        pixels = processor(images=load_rgb(image_path), return_tensors="pt")["pixel_values"]
        image_out = image_model(pixel_values=pixels)
    return text_hidden, image_out.pooler_output[0], image_out.last_hidden_state[0]


def test_cached_embeddings_equal_a_direct_transformers_forward(mvsa_cache, tiny_models):
    expected, out = mvsa_cache
    cache = read_cache(out, tokens=True)
    images = {sid: expected.root / "data" / f"{sid}.jpg" for sid in expected.labels}
    checked = 0
    for split in cache.splits.values():
        for row, sid in enumerate(split.id):
            text_hidden, image_global, image_tokens = direct_forward(tiny_models, expected.texts[str(sid)],
                                                                     images[str(sid)])
            np.testing.assert_allclose(split.text[row], text_hidden[0].numpy(), atol=3e-3, rtol=3e-3)
            np.testing.assert_allclose(split.image[row], image_global.numpy(), atol=3e-3, rtol=3e-3)
            length = int(split.text_mask[row].sum())
            assert length == text_hidden.shape[0] and not split.text_mask[row, length:].any()
            np.testing.assert_allclose(split.text_tokens[row, :length], text_hidden.numpy(), atol=3e-3, rtol=3e-3)
            np.testing.assert_allclose(split.image_tokens[row], image_tokens.numpy(), atol=3e-3, rtol=3e-3)
            assert split.label[row] == expected.labels[str(sid)]
            checked += 1
    assert checked == len(expected.sample_ids) - len(expected.unreadable)


def test_every_skipped_sample_is_recorded_with_its_reason(mvsa_cache):
    expected, out = mvsa_cache
    cache = read_cache(out)
    recorded = {sid: reason for sid, _, reason in cache.skipped}
    assert set(recorded) == set(expected.skipped) | set(expected.unreadable)
    for sid, reason in {**expected.skipped, **expected.unreadable}.items():
        assert reason in recorded[sid]
    kept = {str(i) for split in cache.splits.values() for i in split.id}
    assert kept == expected.sample_ids - set(expected.unreadable)
    assert cache.attrs["complete"] and cache.attrs["format_version"] == 1


def test_cache_info_json_reports_counts_per_split_and_class(mvsa_cache, capsys):
    expected, out = mvsa_cache
    assert main(["cache", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cache = read_cache(out)
    for split, arrays in cache.splits.items():
        counts = info["splits"][split]["per_class"]
        assert counts == {name: int((arrays.label == i).sum()) for i, name in enumerate(LABELS)}
    assert info["fingerprint"] == cache.attrs["fingerprint"] and info["complete"] is True


class StopAfter(Exception):
    pass


def interrupting_progress(batches: int):
    calls = {"n": 0}

    def on_progress(done, total):
        calls["n"] += 1
        if calls["n"] > batches:  # the first call reports the resumed count, then one call per batch
            raise StopAfter

    return on_progress


def test_an_interrupted_and_resumed_extraction_equals_an_uninterrupted_one(tmp_path, tiny_models):
    expected = write_mvsa(tmp_path / "data", kind="multi", n_per_class=5, seed=1, dirty=True)
    bert, dinov2 = tiny_models
    config = dict(dataset="mvsa-multi", root=expected.root, text_model=str(bert), image_model=str(dinov2),
                  device="cpu", batch_size=2, workers=0, tokens=True)
    whole = tmp_path / "whole.h5"
    extract(ExtractConfig(out=whole, **config))
    resumed = tmp_path / "resumed.h5"
    for batches in (2, 3):  # two interruptions, at different points
        with pytest.raises(StopAfter):
            extract(ExtractConfig(out=resumed, **config), interrupting_progress(batches))
        assert not resumed.exists() and resumed.with_name("resumed.h5.partial").is_dir()
    summary = extract(ExtractConfig(out=resumed, **config))
    assert 0 < summary.rows_computed < summary.rows_total  # the finished rows were not recomputed
    a, b = read_cache(whole, tokens=True), read_cache(resumed, tokens=True)
    assert a.skipped == b.skipped and a.attrs["fingerprint"] == b.attrs["fingerprint"]
    for split in a.splits:
        for name in ("text", "image", "label", "id", "text_tokens", "text_mask", "image_tokens"):
            np.testing.assert_array_equal(getattr(a.splits[split], name), getattr(b.splits[split], name))


@pytest.mark.parametrize("dataset", ["memotion", "mvsa-multi", "csv"])
def test_every_dataset_kind_extracts_through_the_cli(tmp_path, tiny_models, dataset, capsys):
    writers = {"memotion": lambda root: write_memotion(root, n_per_class=4, dirty=True, official_test=True),
               "mvsa-multi": lambda root: write_mvsa(root, kind="multi", n_per_class=4, dirty=True),
               "csv": lambda root: write_generic_csv(root, n_per_class=4, dirty=True)}
    expected = writers[dataset](tmp_path / "data")
    out = tmp_path / f"{dataset}.h5"
    assert run_extract(expected.root, out, tiny_models, dataset=dataset) == 0
    assert "samples/s" in capsys.readouterr().out
    cache = read_cache(out)
    kept = {str(i) for split in cache.splits.values() for i in split.id}
    assert kept == expected.sample_ids - set(expected.unreadable)
    assert {sid for sid, _, _ in cache.skipped} == set(expected.skipped) | set(expected.unreadable)


def test_rerunning_a_complete_extraction_does_nothing(mvsa_cache, tiny_models, capsys):
    expected, out = mvsa_cache
    before = out.stat().st_mtime_ns
    assert run_extract(expected.root, out, tiny_models, "--tokens") == 0
    assert "already complete" in capsys.readouterr().out and out.stat().st_mtime_ns == before


def test_a_cache_made_for_other_settings_is_refused(mvsa_cache, tiny_models, capsys):
    expected, out = mvsa_cache
    assert run_extract(expected.root, out, tiny_models, "--max-length", "16") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "other settings" in err


def test_missing_model_fails_in_one_line_saying_how_to_provide_it(tmp_path, tiny_models, capsys):
    expected = write_mvsa(tmp_path / "data", kind="single", n_per_class=2, dirty=False)
    code = main(["extract", "--dataset", "mvsa-single", "--root", str(expected.root), "--out", str(tmp_path / "c.h5"),
                 "--text-model", "bert-base-uncased", "--image-model", str(tiny_models[1]), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "bert-base-uncased" in err and "local folder" in err


def test_an_unparseable_label_file_stops_with_file_and_line(tmp_path, tiny_models, capsys):
    expected = write_mvsa(tmp_path / "data", kind="single", n_per_class=2, dirty=False)
    label_file = expected.root / "labelResultAll.txt"
    label_file.write_text(label_file.read_text() + "77\tpositive;sideways\n")
    assert run_extract(expected.root, tmp_path / "c.h5", tiny_models) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "labelResultAll.txt" in err and "line" in err


def test_limit_keeps_every_split(tmp_path, tiny_models):
    expected = write_mvsa(tmp_path / "data", kind="single", n_per_class=10, dirty=False)
    out = tmp_path / "small.h5"
    assert run_extract(expected.root, out, tiny_models, "--limit", "12") == 0
    cache = read_cache(out)
    sizes = {split: len(arrays.label) for split, arrays in cache.splits.items()}
    assert all(size >= 1 for size in sizes.values()) and sum(sizes.values()) <= 14


def test_a_local_model_folder_is_identified_by_its_weights(tmp_path, tiny_models):
    """Its revision is a digest of the weight files, so a cache made with other weights of the same name differs."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fusion.extract.encoders import load_encoders

    bert, dinov2 = tiny_models
    copy = tmp_path / "bert"
    shutil.copytree(bert, copy)
    same = load_encoders(str(copy), str(dinov2), device="cpu")
    assert same.text_revision == load_encoders(str(bert), str(dinov2), device="cpu").text_revision
    assert same.text_revision.startswith("sha256:") and same.image_revision.startswith("sha256:")
    weights = next(copy.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    changed = load_encoders(str(copy), str(dinov2), device="cpu")
    assert changed.text_revision != same.text_revision and changed.image_revision == same.image_revision
