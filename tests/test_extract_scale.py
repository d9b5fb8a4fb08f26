"""Extraction at scale, in one process: how batches are dealt to ranks, resuming under another number of ranks,
bf16 on CPU, attention kernels and image decoding in workers (the torchrun runs are in test_distributed.py)."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
from dataset_writers import write_image, write_mvsa
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion.cache.reader import read_cache
from fusion.cli import main
from fusion.extract.batches import collate, image_loader, length_sorted_batches
from fusion.extract.encoders import image_embeddings, load_encoders, text_embeddings
from fusion.extract.pipeline import ExtractConfig, extract, pending_batches, shard_batches

ARRAYS = ("text", "image", "label", "id", "text_tokens", "text_mask", "image_tokens")


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), max_size=60), batch_size=st.integers(1, 7), world_size=st.integers(1, 5))
def test_ranks_share_the_batches_of_a_single_process_run(lengths, batch_size, world_size):
    token_ids = [[0] * n for n in lengths]
    whole = shard_batches(token_ids, batch_size, rank=0, world_size=1)
    cut = length_sorted_batches(np.arange(len(lengths)), np.array(lengths or [0]), batch_size)
    assert whole == cut[::-1]  # longest texts first
    shards = [shard_batches(token_ids, batch_size, rank, world_size) for rank in range(world_size)]
    dealt = [batch for shard in shards for batch in shard]
    assert sorted(dealt) == sorted(whole)  # the same batches, each on exactly one rank
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_pending_batches_drop_finished_batches_and_keep_the_rest_whole():
    batches = [[0, 3, 5], [1, 2], [4, 6, 7]]
    assert pending_batches(batches, np.array([1, 2, 4, 6, 7])) == [[1, 2], [4, 6, 7]]
    assert pending_batches(batches, np.array([], dtype=np.int64)) == []


def config_for(root, out, models, **extra) -> ExtractConfig:
    bert, dinov2 = models
    return ExtractConfig(dataset="mvsa-single", root=root, out=out, text_model=str(bert), image_model=str(dinov2),
                         device="cpu", batch_size=2, workers=0, tokens=True, **extra)


def assert_same_cache(path, expected_path) -> None:
    a, b = read_cache(path, tokens=True), read_cache(expected_path, tokens=True)
    assert a.skipped == b.skipped
    for split in a.splits:
        for name in ARRAYS:
            np.testing.assert_array_equal(getattr(a.splits[split], name), getattr(b.splits[split], name))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_mvsa(tmp_path_factory.mktemp("scale") / "data", kind="single", n_per_class=5, seed=2, dirty=True)


def test_a_run_left_by_some_ranks_resumes_identically_under_another_number_of_ranks(dataset, tiny_models, tmp_path):
    reference = tmp_path / "one.h5"
    extract(config_for(dataset.root, reference, tiny_models))
    out = tmp_path / "mixed.h5"
    # Rank 1 of 3 finishes its share and stops (no process group here: ranks other than 0 never merge) ...
    left = extract(config_for(dataset.root, out, tiny_models), rank=1, world_size=3)
    assert not out.exists() and 0 < left.rows_computed < left.rows_total
    # ... then one process takes over the rest and merges.
    summary = extract(config_for(dataset.root, out, tiny_models))
    assert summary.rows_computed == summary.rows_total - len(dataset.skipped) - left.rows_computed
    assert_same_cache(out, reference)


def test_progress_totals_of_all_ranks_add_up_to_the_plan(dataset, tiny_models, tmp_path):
    totals = {}
    out = tmp_path / "c.h5"
    for rank in (1, 0):  # rank 0 last: it merges once every row is written
        on_progress = lambda done, total, rank=rank: totals.setdefault(rank, total)  # noqa: E731
        summary = extract(config_for(dataset.root, out, tiny_models), on_progress, rank=rank, world_size=2)
    assert sum(totals.values()) == summary.rows_total and out.exists()


def test_bf16_on_cpu_is_autocast_with_matrix_weights_cast_once(tiny_models):
    fp32 = load_encoders(str(tiny_models[0]), str(tiny_models[1]), device="cpu", precision="fp32")
    bf16 = load_encoders(str(tiny_models[0]), str(tiny_models[1]), device="cpu", precision="bf16")
    assert bf16.dtype == torch.float32 and bf16.autocast_dtype == torch.bfloat16 and fp32.autocast_dtype is None
    dtypes = {type(m).__name__: m.weight.dtype for m in bf16.text_model.modules() if hasattr(m, "weight")}
    assert dtypes["Linear"] == torch.bfloat16 and dtypes["LayerNorm"] == dtypes["Embedding"] == torch.float32
    torch.manual_seed(0)
    input_ids, mask = torch.randint(5, 60, (4, 12)), torch.ones(4, 12, dtype=torch.long)
    pixels = torch.randn(4, 3, 28, 28)
    with torch.inference_mode():
        ours = [text_embeddings(bf16, input_ids, mask)[0], image_embeddings(bf16, pixels)[0]]
        full = [text_embeddings(fp32, input_ids, mask)[0], image_embeddings(fp32, pixels)[0]]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # plain autocast over the fp32 weights
            plain = [text_embeddings(fp32, input_ids, mask)[0], image_embeddings(fp32, pixels)[0]]
    for mine, autocast, reference in zip(ours, plain, full):
        assert torch.equal(mine, autocast)  # casting once gives the very numbers autocast gives
        assert not torch.equal(mine.float(), reference)  # bf16 arithmetic really happened
        assert torch.nn.functional.cosine_similarity(mine.float(), reference, dim=1).min() > 0.999


def test_fp16_on_cpu_is_refused_in_one_line(dataset, tiny_models, tmp_path, capsys):
    bert, dinov2 = tiny_models
    code = main(["extract", "--dataset", "mvsa-single", "--root", str(dataset.root), "--out", str(tmp_path / "c.h5"),
                 "--text-model", str(bert), "--image-model", str(dinov2), "--device", "cpu", "--precision", "fp16"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "bf16" in err and "fp16" in err


def test_both_encoders_run_scaled_dot_product_attention(tiny_models):
    encoders = load_encoders(str(tiny_models[0]), str(tiny_models[1]), device="cpu")
    assert encoders.text_model.config._attn_implementation == "sdpa"
    assert encoders.image_model.config._attn_implementation == "sdpa"


class PidProcessor:
    """Stands in for an image processor: the 'pixels' say which process decoded the image."""

    def __call__(self, images, return_tensors):
        return {"pixel_values": torch.full((1, 1), float(os.getpid()))}


def test_images_are_decoded_in_worker_processes(tmp_path):
    paths = [write_image(tmp_path / f"{i}.jpg", i) for i in range(6)]
    loader = image_loader(paths, PidProcessor(), [[0, 1, 2], [3, 4, 5]], workers=1, pin_memory=False)
    decoded_by = Counter(int(value) for _, pixels, _ in loader for value in pixels.flatten().tolist())
    assert sum(decoded_by.values()) == 6 and os.getpid() not in decoded_by
    assert collate([(0, None, "empty file")]) == ([], None, {0: "empty file"})


def test_bf16_on_cpu_pads_texts_to_multiples_of_8_but_stores_tokens_unpadded(dataset, tiny_models, tmp_path,
                                                                             monkeypatch):
    fp32_out, bf16_out = tmp_path / "fp32.h5", tmp_path / "bf16.h5"
    extract(config_for(dataset.root, fp32_out, tiny_models))
    seen = []
    original = torch.nn.Module.__call__

    def spy(module, *args, **kwargs):
        if "input_ids" in kwargs:
            seen.append(kwargs["input_ids"].shape[1])
        return original(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", spy)
    extract(config_for(dataset.root, bf16_out, tiny_models, precision="bf16"))
    monkeypatch.undo()
    assert seen and all(length % 8 == 0 for length in seen)
    full, half = read_cache(fp32_out, tokens=True), read_cache(bf16_out, tokens=True)
    for split in full.splits:
        a, b = full.splits[split], half.splits[split]
        assert b.text_mask.shape == a.text_mask.shape  # the width of the longest real text, as in fp32
        np.testing.assert_array_equal(b.text_mask, a.text_mask)
        for name in ("text", "image"):
            x, y = getattr(a, name).astype(np.float64), getattr(b, name).astype(np.float64)
            cosine = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
            assert cosine.min() > 0.999
