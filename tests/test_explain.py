"""Explanations (docs/explain.md): the attention weights dual_attn reports are the ones it used, checked against
attention recomputed by projecting every token; a trained head finds a marker patch that alone decides the label;
what each modality says alone; `fusion predict --explain` (JSON, table, the overlay PNG) gives what the API gives."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cache_fixtures import synthetic_plan, write_batches
from dataset_writers import write_mvsa
from PIL import Image
from tiny_models import extract_argv

import fusion
from fusion.cache.partial import PartialCache
from fusion.cache.reader import read_cache
from fusion.cache.writer import finalize
from fusion.cli import main
from fusion.extract.embedding import embed_posts
from fusion.extract.pixels import visible_box
from fusion.heads.checkpoint import load_run
from fusion.heads.config import FitConfig
from fusion.heads.features import Modality, token_features
from fusion.heads.models import build_head
from fusion.heads.runs import load_features
from fusion.labels import LABELS

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------- the reference: every token projected, its key and the other modality's query, a masked softmax ----------

def projected_attention(head, query_side: str, attended: str, query_tokens: Modality, tokens: Modality):
    """(B, L) weights that `query_side`'s latent gives `attended`'s tokens, computed the plain way: project every
    token (P x + b), take keys W_K and the query W_Q of the other latent, softmax(q.k / sqrt(d)) over real tokens."""
    params = dict(head.named_parameters())
    d = params[f"{attended}_proj.weight"].shape[0]
    latent = query_tokens.tokens[:, 0] @ params[f"{query_side}_proj.weight"].T + params[f"{query_side}_proj.bias"]
    query = latent @ params[f"cross.{query_side}_qkv.weight"][:d].T
    projected = tokens.tokens @ params[f"{attended}_proj.weight"].T + params[f"{attended}_proj.bias"]
    keys = projected @ params[f"cross.{attended}_qkv.weight"][d:2 * d].T
    scores = torch.einsum("bd,bld->bl", query, keys) / math.sqrt(d)
    scores = scores.masked_fill(~tokens.mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def _padded_text(rows: int, length: int, dim: int, generator: torch.Generator) -> Modality:
    tokens = torch.randn(rows, length, dim, generator=generator)
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    lengths[0], lengths[1] = 1, length
    mask = torch.arange(length) < lengths[:, None]
    tokens[~mask] = 1e3 * torch.randn(int((~mask).sum()), dim, generator=generator)  # padding full of garbage
    return Modality(tokens, mask)


def test_the_reported_weights_are_the_ones_the_head_used_sum_to_1_and_give_padding_0():
    generator = torch.Generator().manual_seed(3)
    head = build_head(FitConfig(head="dual_attn", proj_dim=6, hidden=5, seed=2), 10, 7).eval()
    text = _padded_text(9, 6, 10, generator)
    image = Modality(torch.randn(9, 5, 7, generator=generator), torch.ones(9, 5, dtype=torch.bool))
    attention: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        logits = head(text, image, attention)
        torch.testing.assert_close(logits, head(text, image))  # asking for the weights changes nothing
        expected_image = projected_attention(head, "text", "image", text, image)
        expected_text = projected_attention(head, "image", "text", image, text)
    assert set(attention) == {"text", "image"}
    torch.testing.assert_close(attention["image"], expected_image, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(attention["text"], expected_text, atol=1e-5, rtol=1e-4)
    for weights in attention.values():
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(9), atol=1e-6, rtol=0)
    assert bool((attention["text"][~text.mask] == 0).all()) and bool((attention["text"][text.mask] > 0).all())


def test_heads_without_token_attention_report_none():
    head = build_head(FitConfig(head="self_attn", proj_dim=6, hidden=5), 10, 7).eval()
    attention: dict[str, torch.Tensor] = {}
    head(torch.randn(3, 10), torch.randn(3, 7), attention)
    assert attention == {}
    pooled_dual = build_head(FitConfig(head="dual_attn", proj_dim=6, hidden=5), 10, 7).eval()
    pooled_dual(torch.randn(3, 10), torch.randn(3, 7), attention)
    assert attention == {}  # a single key: there is nothing to explain


# ---------- a marker patch that alone decides the label ----------

GRID, TEXT_DIM, IMAGE_DIM, TEXT_LENGTH = 3, 8, 12, 4


def write_marker_cache(path, counts=(600, 200, 200), seed=0):
    """A token cache whose labels only one image patch tells: at a random place of a 3 x 3 grid, each row's marker
    patch holds its class's prototype (three orthogonal directions); every other patch, the pooled image (token 0)
    and the whole text are noise. Returns (cache path, the marker's patch index per cache id)."""
    plan = synthetic_plan(counts, dt=TEXT_DIM, di=IMAGE_DIM, tokens=True, seed=seed)
    rng = np.random.default_rng(seed + 7)
    labels, rows = np.asarray(plan.labels), len(plan.ids)
    prototypes = 4.0 * np.linalg.qr(rng.standard_normal((IMAGE_DIM, 3)))[0].T
    image_tokens = 0.7 * rng.standard_normal((rows, 1 + GRID * GRID, IMAGE_DIM))
    marker = rng.integers(0, GRID * GRID, size=rows)
    image_tokens[np.arange(rows), 1 + marker] = prototypes[labels] + 0.3 * rng.standard_normal((rows, IMAGE_DIM))
    lengths = rng.integers(2, TEXT_LENGTH + 1, size=rows)
    mask = np.arange(TEXT_LENGTH)[None] < lengths[:, None]
    text_tokens = rng.standard_normal((rows, TEXT_LENGTH, TEXT_DIM)) * mask[..., None]
    arrays = {"text": text_tokens[:, 0], "image": image_tokens[:, 0], "text_tokens": text_tokens,
              "image_tokens": image_tokens}
    arrays = {name: values.astype(np.float16) for name, values in arrays.items()}
    arrays.update(text_mask=mask, text_length_of=lengths, skipped={})
    with PartialCache.open(path, plan=plan) as partial:
        write_batches(partial, arrays, partial.pending(), batch_size=50, seed=seed)
    return finalize([partial.directory], path), dict(zip(plan.ids, marker.tolist()))


def test_a_trained_dual_attn_head_looks_hardest_at_the_marker_patch(tmp_path):
    cache, marker = write_marker_cache(tmp_path / "marker.h5")
    run = fusion.fit(cache, head="dual_attn", tokens=True, lr=1e-3, dropout=0.0, loss="ce", epochs=8, batch_size=32,
                     out=tmp_path / "run")
    assert run.metrics["test"]["accuracy"] >= 0.9
    test = load_features(cache, tokens=True)[0]["test"]
    attention: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        load_run(run.path).head(test.text, test.image, attention)
    looked_at = attention["image"][:, 1:].argmax(dim=1).tolist()  # the patches after the class token
    hits = np.mean([seen == marker[id_] for seen, id_ in zip(looked_at, test.ids)])
    assert hits >= 0.9, f"the highest-weight patch is the marker in {hits:.0%} of the test posts"


# ---------- through the Predictor: fusion predict --explain and the API ----------

@pytest.fixture(scope="module")
def token_run(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("explain")
    expected = write_mvsa(folder / "data", kind="single", n_per_class=6, dirty=False)
    cache = folder / "c.h5"
    assert main(extract_argv(expected.root, cache, tiny_models, "--tokens")) == 0
    assert main(["fit", "--cache", str(cache), "--head", "dual_attn", "--tokens", "--epochs", "3", "--lr", "1e-2",
                 "--out", str(folder / "tokens")]) == 0
    assert main(["fit", "--cache", str(cache), "--head", "basic", "--epochs", "3", "--out", str(folder / "pooled")]) \
        == 0
    images = sorted((path for path in (expected.root / "data").glob("*.jpg") if path.stem in expected.texts),
                    key=lambda path: int(path.stem))[:4]
    posts = folder / "posts.csv"
    posts.write_text("image,text\n" + "".join(f"{path},{expected.texts[path.stem]}\n" for path in images))
    return folder, cache, posts, images, [expected.texts[path.stem] for path in images]


def _printed(capsys, argv: list[str]) -> list[dict]:
    capsys.readouterr()
    assert main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_explain_json_is_what_the_api_returns_for_token_and_pooled_runs(token_run, capsys):
    folder, _, posts, images, texts = token_run
    for name in ("tokens", "pooled"):
        printed = _printed(capsys, ["predict", "--run", str(folder / name), "--csv", str(posts), "--explain",
                                    "--json", "--device", "cpu"])
        assert fusion.load_run(folder / name, device="cpu").predict(images, texts, explain=True) == printed
        for answer in printed:
            explanation = answer["explanation"]
            assert list(explanation["text_only"]) == list(LABELS) and list(explanation["image_only"]) == list(LABELS)
            assert sum(explanation["text_only"].values()) == pytest.approx(1, abs=1e-6)
            assert ("text_attention" in explanation) == ("image_attention" in explanation) == (name == "tokens")


def test_token_weights_name_every_real_token_and_are_the_attention_the_head_used(token_run):
    folder, _, _, images, texts = token_run
    predictor = fusion.load_run(folder / "tokens", device="cpu")
    answers = predictor.predict(images, texts, explain=True)
    for image, text, answer in zip(images, texts, answers):
        post = predictor.prepare(image, text)
        explanation = answer["explanation"]
        assert [entry["token"] for entry in explanation["text_attention"]] == \
            predictor.encoders.tokenizer.convert_ids_to_tokens(post.token_ids)
        text_weights = torch.tensor([entry["weight"] for entry in explanation["text_attention"]])
        grid = torch.tensor(explanation["image_attention"], dtype=torch.float64)
        assert grid.shape == (2, 2)  # the tiny DINOv2 reads 28 x 28 pixels in 14 x 14 patches
        assert float(text_weights.sum()) == pytest.approx(1, abs=1e-5) and float(grid.sum()) == pytest.approx(1)
        # The same post's sequences, as the Predictor embeds them, through the plain formula.
        arrays = embed_posts(predictor.encoders, [post.token_ids], post.pixels[None], with_tokens=True)
        features = token_features(arrays["text_tokens"], arrays["text_mask"], arrays["image_tokens"], arrays["text"],
                                  arrays["image"], np.zeros(1))
        head = predictor.loaded.head
        with torch.no_grad():
            expected_text = projected_attention(head, "image", "text", features.image, features.text)[0]
            expected_image = projected_attention(head, "text", "image", features.text, features.image)[0]
        torch.testing.assert_close(text_weights, expected_text[:len(post.token_ids)], atol=1e-5, rtol=1e-4)
        assert explanation["image_attention_cls"] == pytest.approx(float(expected_image[0]), abs=1e-5)
        patches = expected_image[1:] / expected_image[1:].sum()  # row-major: the first row of patches first
        torch.testing.assert_close(grid.flatten(), patches.double(), atol=1e-5, rtol=1e-4)


def test_each_modality_alone_is_the_head_with_the_other_at_its_training_mean(token_run):
    folder, cache, _, images, texts = token_run
    predictor = fusion.load_run(folder / "pooled", device="cpu")
    [answer] = predictor.predict(images[:1], texts[:1], explain=True, raw=True)
    train = read_cache(cache).splits["train"]
    text_mean = torch.tensor(train.text, dtype=torch.float64).mean(dim=0).float()
    image_mean = torch.tensor(train.image, dtype=torch.float64).mean(dim=0).float()
    torch.testing.assert_close(predictor.loaded.train_means["text"], text_mean)
    post = predictor.prepare(images[0], texts[0])
    arrays = embed_posts(predictor.encoders, [post.token_ids], post.pixels[None], with_tokens=False)
    text, image = (torch.tensor(arrays[name], dtype=torch.float32) for name in ("text", "image"))
    head = predictor.loaded.head
    with torch.no_grad():
        text_alone = torch.softmax(head(text, image_mean[None]), dim=-1)[0]
        image_alone = torch.softmax(head(text_mean[None], image), dim=-1)[0]
    shown = answer["explanation"]
    torch.testing.assert_close(torch.tensor([shown["text_only"][name] for name in LABELS]), text_alone)
    torch.testing.assert_close(torch.tensor([shown["image_only"][name] for name in LABELS]), image_alone)
    assert (text_alone - image_alone).abs().max() > 1e-4  # the two entries say different things


def test_predict_explain_out_writes_the_overlay_png_and_prints_the_table(token_run, capsys, tmp_path):
    folder, _, _, images, texts = token_run
    capsys.readouterr()
    assert main(["predict", "--run", str(folder / "tokens"), "--image", str(images[0]), "--text", texts[0],
                 "--explain", "--out", str(tmp_path / "why"), "--device", "cpu"]) == 0
    shown = capsys.readouterr()
    png = tmp_path / "why" / f"{images[0].stem}.explain.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in shown.err
    with Image.open(png) as picture:
        assert picture.size[0] >= 800 and picture.size[1] >= 500
    for column in ("text alone", "image alone", "most attended words", "calibrated (temperature"):
        assert column in shown.out
    assert main(["predict", "--run", str(folder / "tokens"), "--image", str(images[0]), "--text", texts[0],
                 "--out", str(tmp_path / "no")]) == 1
    assert "add --explain" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_the_visible_box_is_the_part_of_the_image_the_processor_keeps(token_run):
    folder = token_run[0]
    predictor = fusion.load_run(folder / "tokens", device="cpu")
    processor = predictor.encoders.pixels.processor  # the tiny DINOv2's: shortest edge 32, centre crop 28 x 28
    # By hand: 64 x 32 resizes to 64 x 32 and the crop keeps 28 of 64 columns and 28 of 32 rows, centred.
    assert visible_box(processor, 64, 32) == pytest.approx({"left": 18 / 64, "top": 2 / 32, "width": 28 / 64,
                                                            "height": 28 / 32})
    # And on pixels: a picture whose columns are numbered; the crop shows the columns the box names.
    columns = np.tile(np.linspace(0, 255, 120).astype(np.uint8)[None, :, None], (60, 1, 3))
    picture = Image.fromarray(columns)
    box = visible_box(processor, 120, 60)
    seen = predictor.encoders.pixels.crop(picture).float()[0]  # uint8 crop, channel 0
    left, right = box["left"] * 255, (box["left"] + box["width"]) * 255
    assert float(seen[:, 0].mean()) == pytest.approx(left, abs=6) and float(seen[:, -1].mean()) == \
        pytest.approx(right, abs=6)
