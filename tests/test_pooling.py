"""Pooling choices: --text-pooling cls|mean, --image-pooling cls|mean|cls+mean, with a RoBERTa-style text model
(<s> as CLS, positions from padding_idx + 1) and DINOv2 with registers (register tokens left out of the mean)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dataset_writers import write_generic_csv, write_image
from tiny_encoders import write_tiny_dinov2_registers, write_tiny_roberta
from tiny_models import extract_argv
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from fusion.cache.partial import PartialCache, Plan
from fusion.cache.reader import read_cache
from fusion.cli import main
from fusion.extract.batches import image_pixels
from fusion.extract.embedding import embed_posts
from fusion.extract.encoders import fit_max_length, load_encoders
from fusion.extract.images import load_rgb
from fusion.extract.pooling import PoolingError, pooling_choice, recorded_pooling, resolve_pooling
from fusion.heads.checkpoint import load_run
from fusion.heads.models import predict_proba
from fusion.heads.features import pooled_modality
from fusion.labels import LABELS

pytestmark = pytest.mark.usefixtures("one_thread")
REGISTERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool-models")
    return write_tiny_roberta(root / "roberta"), write_tiny_dinov2_registers(root / "dinov2reg", registers=REGISTERS)


@pytest.fixture(scope="module")
def mean_cache(tmp_path_factory, models):
    """A CSV dataset extracted with --text-pooling mean --image-pooling cls+mean, in batches of 4 (so padded)."""
    folder = tmp_path_factory.mktemp("pool")
    expected = write_generic_csv(folder / "data", n_per_class=4, dirty=False)
    out = folder / "mean.h5"
    argv = extract_argv(expected.root, out, models, "--batch-size", "4", "--text-pooling", "mean",
                        "--image-pooling", "cls+mean", dataset="csv")
    assert main(argv) == 0
    return expected, out


@pytest.fixture(scope="module")
def direct(models):
    """(token states, image states) of one sample straight from transformers: no batch, so no padding."""
    roberta, dinov2 = models
    tokenizer, text_model = AutoTokenizer.from_pretrained(roberta), AutoModel.from_pretrained(roberta).eval()
    processor = AutoImageProcessor.from_pretrained(dinov2, backend="pil")
    image_model = AutoModel.from_pretrained(dinov2).eval()

    def forward(text: str, image, max_length: int):
        with torch.inference_mode():
            encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            tokens = text_model(**encoded).last_hidden_state[0]
            pixels = processor(images=load_rgb(image), return_tensors="pt")["pixel_values"]
            states = image_model(pixel_values=pixels)
        return tokens.double(), states.last_hidden_state[0].double()
    return forward


def test_mean_and_cls_plus_mean_equal_a_direct_computation_without_padding_or_registers(mean_cache, direct):
    expected, out = mean_cache
    cache = read_cache(out)
    assert (cache.attrs["text_pooling"], cache.attrs["image_pooling"]) == ("mean", "cls+mean")
    assert cache.attrs["image_dim"] == 2 * 24 and cache.attrs["text_dim"] == 32
    lengths, checked = set(), 0
    for split in cache.splits.values():
        for row, sid in enumerate(split.id):
            tokens, states = direct(expected.texts[str(sid)], expected.root.parent / str(sid),
                                    int(cache.attrs["max_length"]))
            lengths.add(tokens.shape[0])
            np.testing.assert_allclose(split.text[row], tokens.mean(0).numpy(), atol=3e-3, rtol=3e-3)
            patches = states[1 + REGISTERS:]
            assert patches.shape[0] == (28 // 14) ** 2
            np.testing.assert_allclose(split.image[row], torch.cat([states[0], patches.mean(0)]).numpy(),
                                       atol=3e-3, rtol=3e-3)
            checked += 1
    assert checked == len(expected.sample_ids) and len(lengths) > 1  # texts of several lengths: padding was there


def test_roberta_cls_is_its_first_token_and_image_mean_skips_registers(models, direct, tmp_path):
    encoders = load_encoders(*map(str, models), device="cpu", image_pooling="mean")
    assert (encoders.text_pooling, encoders.image_pooling) == ("cls", "mean")
    texts = ["good day", "a much longer text about a sad cat"]
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for i, path in enumerate(images):
        write_image(path, i)
    token_ids = encoders.tokenizer(texts, truncation=True, max_length=38)["input_ids"]
    pixels = torch.stack([image_pixels(path, encoders.image_processor) for path in images])
    arrays = embed_posts(encoders, token_ids, pixels, with_tokens=False)
    for row, (text, image) in enumerate(zip(texts, images)):
        tokens, states = direct(text, image, 38)
        np.testing.assert_allclose(arrays["text"][row], tokens[0].numpy(), atol=3e-3, rtol=3e-3)
        np.testing.assert_allclose(arrays["image"][row], states[1 + REGISTERS:].mean(0).numpy(), atol=3e-3,
                                   rtol=3e-3)
        assert not np.allclose(arrays["image"][row], states[1:].mean(0).numpy(), atol=3e-3)  # registers matter


def test_roberta_max_length_leaves_room_for_its_position_offset(models):
    encoders = load_encoders(*map(str, models), device="cpu")
    assert fit_max_length(encoders, 128) == 40 - 2  # positions 0 and 1 (padding_idx) are never a token's
    ids = encoders.tokenizer(["word " * 200], truncation=True, max_length=38)["input_ids"]
    pixels = torch.zeros((1, 3, 28, 28))
    assert embed_posts(encoders, ids, pixels, with_tokens=False)["text"].shape == (1, 32)


def test_predict_pools_as_the_cache_did(mean_cache, tmp_path, capsys):
    expected, out = mean_cache
    run = tmp_path / "run"
    assert main(["fit", "--cache", str(out), "--head", "basic", "--epochs", "2", "--out", str(run)]) == 0
    cache = read_cache(out)
    test = cache.splits["test"]
    posts = tmp_path / "posts.csv"
    posts.write_text("image,text\n" + "".join(f"{expected.root.parent / str(sid)},{expected.texts[str(sid)]}\n"
                                              for sid in test.id), encoding="utf-8")
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--csv", str(posts), "--device", "cpu", "--json",
                 "--raw"]) == 0  # the head's own softmax, as predict_proba gives it
    predicted = [json.loads(line)["probabilities"] for line in capsys.readouterr().out.splitlines()]
    head = load_run(run).head
    from_cache = predict_proba(head, pooled_modality(test.text), pooled_modality(test.image))
    np.testing.assert_allclose([[p[name] for name in LABELS] for p in predicted], from_cache, atol=2e-3)


def test_a_cache_made_with_another_pooling_is_refused_by_name(mean_cache, models, capsys):
    expected, out = mean_cache
    capsys.readouterr()
    argv = extract_argv(expected.root, out, models, "--text-pooling", "cls", "--image-pooling", "cls+mean",
                        dataset="csv")
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "text_pooling 'mean'" in error and "'cls'" in error


def test_a_partial_cache_made_with_another_pooling_is_refused_by_name(mean_cache, models, tmp_path, capsys):
    expected, _ = mean_cache
    out = tmp_path / "partial.h5"
    plan = Plan(fingerprint="0" * 64, attrs={"text_pooling": "cls", "image_pooling": "cls_layernorm"}, ids=[],
                splits=[], labels=[])
    PartialCache.open(out, plan=plan).close()
    capsys.readouterr()
    assert main(extract_argv(expected.root, out, models, "--image-pooling", "mean", dataset="csv")) == 1
    error = capsys.readouterr().err.strip()
    assert "partial" in error and "image_pooling 'cls_layernorm'" in error and "'mean'" in error


def test_tokens_with_a_pooled_vector_of_another_width_is_refused(mean_cache, models, tmp_path, capsys):
    expected, _ = mean_cache
    capsys.readouterr()
    argv = extract_argv(expected.root, tmp_path / "t.h5", models, "--tokens", "--image-pooling", "cls+mean",
                        dataset="csv")
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--tokens" in error and "cls+mean" in error
    assert not (tmp_path / "t.h5").exists()


def test_pooling_names_choices_and_refusals():
    assert recorded_pooling("image", "cls") == "cls_layernorm" and recorded_pooling("text", "cls") == "cls"
    for modality, choice in (("text", "mean"), ("image", "cls"), ("image", "cls+mean"), ("text", "projected")):
        assert pooling_choice(modality, recorded_pooling(modality, choice)) == choice
    assert resolve_pooling("image", None, dual=False, model="m") == "cls"
    assert resolve_pooling("text", None, dual=True, model="m") == "projected"
    with pytest.raises(PoolingError, match="choose one of"):
        resolve_pooling("text", "cls+mean", dual=False, model="m")
    with pytest.raises(PoolingError, match="needs a dual encoder"):
        resolve_pooling("image", "projected", dual=False, model="m")
