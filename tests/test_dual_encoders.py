"""Dual encoders (CLIP, SigLIP): loaded once, features from get_text_features / get_image_features (pooling
`projected`), tokenizer and image processor from AutoProcessor; alone, in pairs of two, or beside a plain encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dataset_writers import write_generic_csv, write_image
from tiny_encoders import write_tiny_clip, write_tiny_siglip
from tiny_models import extract_argv
from transformers import AutoModel, AutoProcessor

from fusion.cache.reader import read_cache
from fusion.cli import main
from fusion.extract.batches import image_pixels
from fusion.extract.embedding import embed_posts
from fusion.extract.encoders import load_encoders
from fusion.extract.images import load_rgb

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def duals(tmp_path_factory):
    root = tmp_path_factory.mktemp("dual-models")
    return {"clip": write_tiny_clip(root / "clip"), "siglip": write_tiny_siglip(root / "siglip")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_generic_csv(tmp_path_factory.mktemp("dual-data") / "data", n_per_class=3, dirty=False)


class Reference:
    """get_text_features / get_image_features called as the model cards show, one sample at a time."""

    def __init__(self, folder):
        self.processor = AutoProcessor.from_pretrained(folder, backend="pil")
        self.model = AutoModel.from_pretrained(folder).eval()
        # SigLIP was trained on texts padded to its full length, and its model card calls it so.
        self.padding = "max_length" if self.model.config.model_type == "siglip" else False

    def text(self, text: str, max_length: int) -> np.ndarray:
        encoded = self.processor.tokenizer(text, padding=self.padding, truncation=True, max_length=max_length,
                                           return_tensors="pt")
        with torch.inference_mode():
            return _tensor(self.model.get_text_features(**encoded))[0].numpy()

    def image(self, path) -> np.ndarray:
        pixels = self.processor.image_processor(images=load_rgb(path), return_tensors="pt")
        with torch.inference_mode():
            return _tensor(self.model.get_image_features(**pixels))[0].numpy()


def _tensor(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def extract(dataset, out, text_model, image_model, *extra) -> int:
    return main(extract_argv(dataset.root, out, (text_model, image_model), "--batch-size", "4", *extra,
                             dataset="csv"))


def assert_cache_matches(cache_path, dataset, text_reference: Reference, image_reference: Reference) -> int:
    cache = read_cache(cache_path)
    max_length = int(cache.attrs["max_length"])
    checked = 0
    for split in cache.splits.values():
        for row, sid in enumerate(split.id):
            np.testing.assert_allclose(split.text[row], text_reference.text(dataset.texts[str(sid)], max_length),
                                       atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(split.image[row], image_reference.image(dataset.root.parent / str(sid)),
                                       atol=2e-3, rtol=2e-3)
            checked += 1
    assert checked == len(dataset.sample_ids)
    return checked


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_one_dual_encoder_for_both_extracts_its_own_features_and_trains(name, duals, dataset, tmp_path):
    out = tmp_path / f"{name}.h5"
    assert extract(dataset, out, duals[name], duals[name]) == 0
    attrs = read_cache(out).attrs
    assert (attrs["text_pooling"], attrs["image_pooling"]) == ("projected", "projected")
    reference = Reference(duals[name])
    assert (attrs["text_dim"], attrs["image_dim"]) == (len(reference.text("a", 8)), len(reference.image(
        dataset.root.parent / next(iter(dataset.sample_ids)))))
    assert_cache_matches(out, dataset, reference, reference)
    assert main(["fit", "--cache", str(out), "--head", "self_attn", "--epochs", "2",
                 "--out", str(tmp_path / "run")]) == 0


def test_two_different_dual_encoders(duals, dataset, tmp_path):
    out = tmp_path / "clip-siglip.h5"
    assert extract(dataset, out, duals["clip"], duals["siglip"]) == 0
    assert_cache_matches(out, dataset, Reference(duals["clip"]), Reference(duals["siglip"]))


def test_a_checkpoint_named_twice_is_loaded_once(duals):
    encoders = load_encoders(str(duals["clip"]), str(duals["clip"]), device="cpu")
    assert encoders.text_model is encoders.image_model
    assert type(encoders.tokenizer).__name__ == "CLIPTokenizer"
    assert type(encoders.image_processor).__name__.startswith("CLIPImageProcessor")


def test_a_dual_encoder_beside_a_plain_one(duals, tiny_models, tmp_path):
    bert, dinov2 = map(str, tiny_models)
    image_path = write_image(tmp_path / "post.png", 3)
    text = "not bad at all"
    for text_model, image_model in ((bert, str(duals["siglip"])), (str(duals["clip"]), dinov2)):
        encoders = load_encoders(text_model, image_model, device="cpu")
        token_ids = encoders.tokenizer([text], truncation=True, max_length=32)["input_ids"]
        pixels = image_pixels(image_path, encoders.image_processor)[None]
        arrays = embed_posts(encoders, token_ids, pixels, with_tokens=False)
        assert arrays["text"].shape == (1, encoders.text_dim) and arrays["image"].shape == (1, encoders.image_dim)
        if image_model == str(duals["siglip"]):
            assert encoders.text_pooling == "cls" and encoders.image_pooling == "projected"
            np.testing.assert_allclose(arrays["image"][0], Reference(duals["siglip"]).image(image_path), atol=2e-3)
        else:
            assert encoders.text_pooling == "projected" and encoders.image_pooling == "cls"
            np.testing.assert_allclose(arrays["text"][0], Reference(duals["clip"]).text(text, 32), atol=2e-3)


def test_tokens_and_other_poolings_are_refused_for_a_dual_encoder(duals, dataset, tmp_path, capsys):
    capsys.readouterr()
    assert extract(dataset, tmp_path / "t.h5", duals["clip"], duals["clip"], "--tokens") == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--tokens" in error and "projected" in error
    assert extract(dataset, tmp_path / "m.h5", duals["clip"], duals["clip"], "--text-pooling", "mean") == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "dual encoder" in error and "projected" in error
    assert not (tmp_path / "t.h5").exists() and not (tmp_path / "m.h5").exists()
