"""dual_attn on token sequences: the feature-space attention against the direct formula (every token projected),
forward and gradients, with padding; training on tokens end to end; the note for dual_attn on pooled features."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cache_fixtures import write_synthetic_cache

from fusion.app.reporting.report import write_report
from fusion.cli import main
from fusion.heads.config import FitConfig
from fusion.heads.features import Modality, SplitFeatures
from fusion.heads.layers import token_cross_attention
from fusion.heads.models import head_forward, init_params, param_shapes
from fusion.heads.registry import HEADS, POOLED_DUAL_ATTN_NOTE, pooled_dual_attn_note
from fusion.heads.train import train_head

pytestmark = pytest.mark.usefixtures("one_thread")

DUAL = HEADS["dual_attn"]


# ---------- the direct formula, written out: project every token, then softmax attention over the real ones ----------

def direct_attention(query, keys, values, mask):
    """query (M, B, d); keys, values (M, B, L, d); mask (B, L) -> (M, B, d)."""
    scores = torch.einsum("mbd,mbld->mbl", query, keys) / math.sqrt(query.shape[-1])
    scores = torch.where(mask.unsqueeze(0), scores, torch.tensor(float("-inf"), dtype=scores.dtype))
    return torch.einsum("mbl,mbld->mbd", torch.softmax(scores, dim=-1), values)


def project(tokens, weight, bias):
    """(B, L, D) tokens through M models' (M, d, D) weights -> (M, B, L, d)."""
    return torch.einsum("bld,mkd->mblk", tokens, weight) + bias[:, None, None, :]


def direct_dual_attn_logits(p, text: Modality, image: Modality):
    d = p["text_proj.weight"].shape[1]
    h = project(text.tokens, p["text_proj.weight"], p["text_proj.bias"])
    g = project(image.tokens, p["image_proj.weight"], p["image_proj.bias"])
    wt, wi = p["cross.text_qkv.weight"], p["cross.image_qkv.weight"]
    q_t, q_i = (torch.einsum("mbk,mjk->mbj", h[:, :, 0], wt[:, :d]),
                torch.einsum("mbk,mjk->mbj", g[:, :, 0], wi[:, :d]))
    k_t, v_t = torch.einsum("mblk,mjk->mblj", h, wt[:, d:2 * d]), torch.einsum("mblk,mjk->mblj", h, wt[:, 2 * d:])
    k_i, v_i = torch.einsum("mblk,mjk->mblj", g, wi[:, d:2 * d]), torch.einsum("mblk,mjk->mblj", g, wi[:, 2 * d:])
    pair = torch.stack((direct_attention(q_t, k_i, v_i, image.mask), direct_attention(q_i, k_t, v_t, text.mask)), 2)
    w = p["fusion.qkv.weight"]  # Eq. 7 over the pair (T', V')
    q, k, v = (torch.einsum("mbtk,mjk->mbtj", pair, w[:, i * d:(i + 1) * d]) for i in range(3))
    attended = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    fused = attended.flatten(2)
    hidden = torch.relu(torch.einsum("mbf,mhf->mbh", fused, p["classifier.hidden.weight"])
                        + p["classifier.hidden.bias"][:, None])
    return torch.einsum("mbh,moh->mbo", hidden, p["classifier.out.weight"]) + p["classifier.out.bias"][:, None]


# ---------- inputs: several stacked models, rows of different lengths, padding full of large garbage ----------

def padded(rows, length, dim, generator, dtype):
    tokens = torch.randn(rows, length, dim, generator=generator, dtype=dtype)
    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    lengths[0], lengths[1] = 1, length  # a row with only token 0 real and a row with none masked
    mask = torch.arange(length) < lengths.unsqueeze(1)
    tokens[~mask] = 1e3 * torch.randn(int((~mask).sum()), dim, generator=generator, dtype=dtype)
    return Modality(tokens, mask)


def stacked_params(models=3, text_dim=10, image_dim=7, proj_dim=6, hidden=5, dtype=torch.float64):
    shapes = param_shapes(DUAL, text_dim, image_dim, proj_dim, hidden)
    singles = [init_params(shapes, "dual_attn", seed) for seed in range(models)]
    return {name: torch.stack([s[name] for s in singles]).to(dtype).requires_grad_() for name in shapes}


def test_feature_space_attention_equals_projecting_every_token_with_gradients():
    generator = torch.Generator().manual_seed(1)
    models, rows, length, dim, d = 4, 9, 6, 11, 5
    others = padded(rows, length, dim, generator, torch.float64)
    inputs = [torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_()
              for shape in ((models, rows, d), (models, d, dim), (models, d), (models, d, d), (models, d, d))]
    query, proj_weight, proj_bias, key_weight, value_weight = inputs
    fast = token_cross_attention(query, others.tokens, others.mask, proj_weight, proj_bias, key_weight, value_weight)
    projected = project(others.tokens, proj_weight, proj_bias)
    direct = direct_attention(query, torch.einsum("mblk,mjk->mblj", projected, key_weight),
                              torch.einsum("mblk,mjk->mblj", projected, value_weight), others.mask)
    torch.testing.assert_close(fast, direct, rtol=1e-10, atol=1e-10)
    upstream = torch.randn(fast.shape, generator=generator, dtype=torch.float64)
    fast_grads = torch.autograd.grad((fast * upstream).sum(), inputs)
    direct_grads = torch.autograd.grad((direct * upstream).sum(), inputs)
    for name, got, want in zip(("query", "proj_weight", "proj_bias", "key_weight", "value_weight"), fast_grads,
                               direct_grads):
        assert want.abs().max() > 1e-3, name  # every input matters, so a wrong gradient cannot pass as zero
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_stacked_dual_attn_heads_equal_the_direct_formula_forward_and_gradients(dtype, tolerance):
    generator = torch.Generator().manual_seed(2)
    params = stacked_params(dtype=dtype)
    text, image = padded(8, 7, 10, generator, dtype), padded(8, 4, 7, generator, dtype)
    fast = head_forward(DUAL, params, text, image)
    direct = direct_dual_attn_logits(params, text, image)
    torch.testing.assert_close(fast, direct, rtol=tolerance, atol=tolerance)
    upstream = torch.randn(fast.shape, generator=generator, dtype=dtype)
    names = list(params)
    fast_grads = torch.autograd.grad((fast * upstream).sum(), [params[n] for n in names])
    direct_grads = torch.autograd.grad((direct * upstream).sum(), [params[n] for n in names])
    for name, got, want in zip(names, fast_grads, direct_grads):
        assert want.abs().max() > 1e-6, name  # W_Q and W_K included: on tokens they are live parameters
        torch.testing.assert_close(got, want, rtol=10 * tolerance, atol=10 * tolerance, msg=name)


def test_on_pooled_features_the_query_and_key_weights_get_no_gradient():
    generator = torch.Generator().manual_seed(3)
    params = stacked_params()
    text, image = padded(5, 1, 10, generator, torch.float64), padded(5, 1, 7, generator, torch.float64)
    fast = head_forward(DUAL, params, text, image)
    torch.testing.assert_close(fast, direct_dual_attn_logits(params, text, image), rtol=1e-10, atol=1e-10)
    grads = dict(zip(params, torch.autograd.grad(fast.sum(), list(params.values()), allow_unused=True,
                                                 materialize_grads=True)))
    d = params["text_proj.weight"].shape[1]
    for name in ("cross.text_qkv.weight", "cross.image_qkv.weight"):
        assert torch.count_nonzero(grads[name][:, :2 * d]) == 0  # W_Q, W_K: the single-key variant
        assert torch.count_nonzero(grads[name][:, 2 * d:]) > 0  # W_V


# ---------- training on tokens end to end ----------

def marker_split(rows: int, seed: int) -> SplitFeatures:
    """The label is which of three marker vectors one image patch (never token 0) carries; the pooled token 0 and
    the text are noise, so only attention over the tokens can find it."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 3, (rows,), generator=generator)
    image = torch.randn(rows, 5, 6, generator=generator)
    position = torch.randint(1, 5, (rows,), generator=generator)
    image[torch.arange(rows), position] = 4.0 * torch.eye(6)[label]
    text = padded(rows, 4, 5, generator, torch.float32)
    return SplitFeatures(text, Modality(image, torch.ones(rows, 5, dtype=torch.bool)), label)


def test_dual_attn_trains_on_tokens_and_finds_what_pooled_features_cannot_show():
    features = {"train": marker_split(600, 0), "val": marker_split(200, 1), "test": marker_split(200, 2)}
    config = FitConfig(head="dual_attn", lr=1e-2, dropout=0.0, loss="ce", epochs=15, patience=15, batch_size=64,
                       proj_dim=16, hidden=16, metric="accuracy")
    on_tokens = train_head(features, config)
    pooled = train_head({name: split.latents_only() for name, split in features.items()}, config)
    assert on_tokens.test["accuracy"] > 0.9, on_tokens.test
    assert pooled.test["accuracy"] < 0.5, pooled.test  # token 0 alone carries nothing: the tokens did the work


# ---------- the note for dual_attn on pooled features ----------

def test_the_note_names_pooled_dual_attn_only():
    assert pooled_dual_attn_note(["basic", "dual_attn"], tokens=False) == POOLED_DUAL_ATTN_NOTE
    assert "single-key (linear) variant" in POOLED_DUAL_ATTN_NOTE and "--tokens" in POOLED_DUAL_ATTN_NOTE
    assert pooled_dual_attn_note(["dual_attn"], tokens=True) is None
    assert pooled_dual_attn_note(["basic", "self_attn", "text_only"], tokens=False) is None


def _noted(tmp_path, capsys, name: str, argv: list[str]) -> tuple[bool, bool]:
    """Whether the note was printed by the command, and whether it is in the report.md written for its output."""
    cache = tmp_path / "c.h5"
    if not cache.exists():
        write_synthetic_cache(cache, (30, 10, 10), dt=12, di=8, tokens=True)
    out = tmp_path / name
    assert main([*argv, "--cache", str(cache), "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    return POOLED_DUAL_ATTN_NOTE in printed, POOLED_DUAL_ATTN_NOTE in write_report(out).markdown.read_text()


def test_fit_and_its_report_say_when_dual_attn_ran_on_pooled_features(tmp_path, capsys):
    assert _noted(tmp_path, capsys, "pooled", ["fit", "--head", "dual_attn"]) == (True, True)
    assert _noted(tmp_path, capsys, "tokens", ["fit", "--head", "dual_attn", "--tokens"]) == (False, False)
    assert _noted(tmp_path, capsys, "basic", ["fit", "--head", "basic"]) == (False, False)
    # a run written before config.json recorded "tokens" was trained on pooled features
    config = json.loads((tmp_path / "tokens" / "config.json").read_text())
    del config["tokens"]
    (tmp_path / "tokens" / "config.json").write_text(json.dumps(config))
    assert POOLED_DUAL_ATTN_NOTE in write_report(tmp_path / "tokens").markdown.read_text()


def test_grid_and_its_report_say_when_dual_attn_ran_on_pooled_features(tmp_path, capsys):
    grid = ["grid", "--heads", "basic,dual_attn", "--lrs", "1e-3", "--dropouts", "0", "--losses", "ce"]
    assert _noted(tmp_path, capsys, "grid", grid) == (True, True)
    assert _noted(tmp_path, capsys, "grid_tokens", [*grid, "--tokens"]) == (False, False)
