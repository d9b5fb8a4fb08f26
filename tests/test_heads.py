"""Heads, losses, metrics, config and features: the math against direct computations from the definitions."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from fusion.heads.config import ConfigError, FitConfig, config_from_dict
from fusion.heads.features import Modality, features_from_cache
from fusion.heads.layers import dropout
from fusion.heads.losses import cross_entropy, focal_loss
from fusion.heads.metrics import classification_metrics, confusion_counts
from fusion.heads.models import build_head, head_forward, init_params, param_shapes, predict_proba
from fusion.heads.registry import HEADS, list_heads
from fusion.errors import CacheError
from synthetic import stand_in_cache, token_split



pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(proj_dim=8, hidden=5)


# ---------- the paper's math, written out per sample ----------

def _linear(x, sd, name, bias=True):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if bias else y


def _attend(query, keys, values, mask=None):
    scores = query @ keys.T / math.sqrt(query.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ values


def _self_attention(tokens, weight):  # Eq. 7 over a (2, d) sequence
    d = tokens.shape[-1]
    q, k, v = tokens @ weight[:d].T, tokens @ weight[d:2 * d].T, tokens @ weight[2 * d:].T
    return _attend(q, k, v).reshape(-1)


def reference_logits(head, sd, text: Modality, image: Modality):
    rows = []
    for i in range(text.tokens.shape[0]):
        h = _linear(text.tokens[i], sd, "text_proj") if "text_proj.weight" in sd else None
        g = _linear(image.tokens[i], sd, "image_proj") if "image_proj.weight" in sd else None
        if head == "basic":
            fused = torch.cat([h[0], g[0]])
        elif head == "self_attn":
            fused = _self_attention(torch.stack([h[0], g[0]]), sd["fusion.qkv.weight"])
        elif head == "dual_attn":
            wt, wv = sd["cross.text_qkv.weight"], sd["cross.image_qkv.weight"]
            d = h.shape[-1]
            t_adj = _attend(h[0] @ wt[:d].T, g @ wv[d:2 * d].T, g @ wv[2 * d:].T, image.mask[i])  # Eq. 8-10
            v_adj = _attend(g[0] @ wv[:d].T, h @ wt[d:2 * d].T, h @ wt[2 * d:].T, text.mask[i])
            fused = _self_attention(torch.stack([t_adj, v_adj]), sd["fusion.qkv.weight"])
        else:
            fused = h[0] if head == "text_only" else g[0]
        hidden = torch.relu(_linear(fused, sd, "classifier.hidden"))
        rows.append(_linear(hidden, sd, "classifier.out"))
    return torch.stack(rows)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("lengths", [(1, 1), (5, 3)])
def test_heads_compute_the_papers_equations(head, lengths):
    split = token_split(7, *lengths, seed=3)
    model = build_head(FitConfig(head=head, seed=1, **SMALL), 6, 4).eval()
    sd = {name: p.detach() for name, p in model.state_dict().items()}
    expected = reference_logits(head, sd, split.text, split.image)
    torch.testing.assert_close(model(split.text, split.image), expected, rtol=1e-5, atol=1e-5)


def test_registry_and_paper_shapes():
    assert list_heads() == ["basic", "self_attn", "dual_attn", "text_only", "image_only"]
    shapes = param_shapes(HEADS["dual_attn"], 768, 384, 256, 256)
    assert shapes["text_proj.weight"] == (256, 768) and shapes["text_proj.bias"] == (256,)  # Eq. 1
    assert shapes["image_proj.weight"] == (256, 384) and shapes["image_proj.bias"] == (256,)  # Eq. 4
    assert shapes["classifier.hidden.weight"] == (256, 512) and shapes["classifier.out.weight"] == (3, 256)
    ablation = param_shapes(HEADS["text_only"], 768, 384, 256, 256)
    assert "image_proj.weight" not in ablation and ablation["classifier.hidden.weight"] == (256, 256)
    with pytest.raises(ConfigError, match="head 'nope'"):
        FitConfig(head="nope")


def test_padding_cannot_change_logits_but_real_tokens_do():
    split = token_split(6, 5, 3, seed=4)
    model = build_head(FitConfig(head="dual_attn", **SMALL), 6, 4).eval()
    before = model(split.text, split.image)
    noisy = split.text.tokens.clone()
    noisy[~split.text.mask] = 1e3 * torch.randn(int((~split.text.mask).sum()), 6)
    torch.testing.assert_close(model(Modality(noisy, split.text.mask), split.image), before, rtol=0, atol=0)
    real = split.text.tokens.clone()
    real[:, 0] += 1.0  # a real token: the logits must move (so the check above can fail)
    assert not torch.allclose(model(Modality(real, split.text.mask), split.image), before)


@pytest.mark.parametrize("head", list(HEADS))
def test_stacked_models_equal_single_heads(head):
    split = token_split(9, 4, 2, seed=5)
    configs = [FitConfig(head=head, seed=s, **SMALL) for s in (0, 1, 2)]
    shapes = param_shapes(HEADS[head], 6, 4, 8, 5)
    singles = [init_params(shapes, head, c.seed) for c in configs]
    stacked = {name: torch.stack([p[name] for p in singles]) for name in shapes}
    logits = head_forward(HEADS[head], stacked, split.text, split.image)
    for m, config in enumerate(configs):
        alone = build_head(config, 6, 4).eval()(split.text, split.image)
        torch.testing.assert_close(logits[m], alone, rtol=1e-5, atol=1e-6)


def test_init_is_seeded_by_seed_and_head():
    def weights(head, seed):
        return build_head(FitConfig(head=head, seed=seed), 6, 4).text_proj.weight

    assert torch.equal(weights("basic", 0), weights("basic", 0))
    assert not torch.equal(weights("basic", 0), weights("basic", 1))
    assert not torch.equal(weights("basic", 0), weights("self_attn", 0))


def test_dropout_rate_per_model():
    x = torch.ones(3, 400, 50)
    noise = torch.rand(400, 50, generator=torch.Generator().manual_seed(0))
    out = dropout(x, torch.tensor([0.0, 0.2, 0.5]), noise)
    assert torch.equal(out[0], x[0])
    for m, rate in ((1, 0.2), (2, 0.5)):
        kept = out[m] != 0
        assert abs(kept.float().mean().item() - (1 - rate)) < 0.02
        torch.testing.assert_close(out[m][kept], torch.full_like(out[m][kept], 1 / (1 - rate)))


# ---------- losses ----------

def _focal_by_definition(logits, target, gamma, alpha=None):
    total = 0.0
    for row, label in zip(logits.tolist(), target.tolist()):
        p_t = math.exp(row[label]) / sum(math.exp(v) for v in row)
        weight = 1.0 if alpha is None else alpha[label]
        total += -weight * (1 - p_t) ** gamma * math.log(p_t)
    return total / len(target)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [None, (0.25, 1.0, 2.0)])
def test_focal_loss_matches_its_definition(gamma, alpha):
    generator = torch.Generator().manual_seed(0)
    logits, target = 3 * torch.randn(32, 3, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    alpha_tensor = None if alpha is None else torch.tensor(alpha)
    assert focal_loss(logits, target, gamma, alpha_tensor).item() == pytest.approx(
        _focal_by_definition(logits, target, gamma, alpha), rel=1e-5)


def test_gamma_zero_is_cross_entropy_and_gradients_stay_finite():
    logits = torch.tensor([[30.0, -30.0, 0.0], [0.1, 0.2, 0.3]], requires_grad=True)  # p_t rounds to 1 in row 0
    target = torch.tensor([0, 2])
    loss = focal_loss(logits, target, 0.0)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))
    torch.testing.assert_close(cross_entropy(logits, target), F.cross_entropy(logits, target))
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad, torch.autograd.grad(F.cross_entropy(logits, target), logits)[0])
    assert torch.isfinite(torch.autograd.grad(focal_loss(logits, target, 2.0), logits)[0]).all()


def test_focal_loss_per_model_gamma_and_alpha():
    generator = torch.Generator().manual_seed(1)
    logits, target = torch.randn(3, 16, 3, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    gammas, alphas = torch.tensor([0.0, 2.0, 3.0]), torch.tensor([[1.0, 1, 1], [0.5, 1, 2], [2.0, 1, 1]])
    stacked = focal_loss(logits, target, gammas, alphas)
    for m in range(3):
        assert stacked[m].item() == pytest.approx(focal_loss(logits[m], target, gammas[m].item(), alphas[m]).item())


# ---------- metrics, config, features ----------

@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3 if seed else 2, 50)  # seed 0: class 2 absent (zero_division)
    y_pred = rng.integers(0, 3, 50)
    metrics = classification_metrics(y_true, y_pred)
    kwargs = dict(labels=[0, 1, 2], zero_division=0)
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", **kwargs))
    assert metrics["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted", **kwargs))
    per_class = precision_recall_fscore_support(y_true, y_pred, **kwargs)[2]
    assert list(metrics["per_class_f1"].values()) == pytest.approx(list(per_class))
    assert list(metrics["per_class_f1"]) == ["negative", "neutral", "positive"]
    assert metrics["accuracy"] == pytest.approx(float(np.mean(y_true == y_pred)))
    assert confusion_counts(y_true, y_pred) == confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()


@pytest.mark.parametrize("field, value, message", [
    ("lr", 0, "lr must be > 0"), ("lr", "fast", "lr must be a finite number"), ("dropout", 1.0, "dropout"),
    ("loss", "mse", "loss 'mse'"), ("metric", "auc", "metric"), ("batch_size", 2.5, "batch_size must be an integer"),
    ("epochs", True, "epochs must be an integer"), ("alpha", (1, 2), "alpha"), ("gamma", -1, "gamma"),
])
def test_config_validation(field, value, message):
    with pytest.raises(ConfigError, match=message):
        FitConfig(**{field: value})


def test_config_from_dict():
    config = FitConfig(alpha=(1, 2, 3), lr=1)
    assert config.alpha == (1.0, 2.0, 3.0) and config.lr == 1.0 and FitConfig(loss="ce").focal_gamma == 0.0
    values = {**config.__dict__, "alpha": [1, 2, 3]}
    assert config_from_dict(values) == config
    with pytest.raises(ConfigError, match="unknown config key"):
        config_from_dict({**values, "momentum": 0.9})


def test_features_from_cache_pooled_and_tokens():
    data = stand_in_cache({"train": 5, "val": 3, "test": 2}, tokens=True)
    pooled = features_from_cache(data)
    assert pooled["train"].text.tokens.shape == (5, 1, 6) and pooled["train"].text.tokens.dtype == torch.float32
    assert pooled["val"].image.mask.all() and pooled["test"].label.dtype == torch.long
    np.testing.assert_array_equal(pooled["train"].text.tokens[:, 0].numpy(),
                                  data.splits["train"].text.astype(np.float32))
    tokens = features_from_cache(data, tokens=True)["train"]
    assert tokens.text.tokens.shape == (5, 5, 6) and tokens.image.tokens.shape == (5, 3, 4)
    assert torch.equal(tokens.text.tokens[:, 0], pooled["train"].text.tokens[:, 0])  # token 0 = the pooled latent
    assert torch.equal(tokens.text.mask[:, 1:], torch.from_numpy(data.splits["train"].text_mask)[:, 1:])
    with pytest.raises(CacheError, match="--tokens"):
        features_from_cache(stand_in_cache({"train": 2, "val": 2}), tokens=True)
    with pytest.raises(CacheError, match="train and val"):
        features_from_cache(stand_in_cache({"train": 2}))


def test_predict_proba():
    split = token_split(10, 1, 1)
    head = build_head(FitConfig(head="basic", **SMALL), 6, 4)
    proba = predict_proba(head, split.text.tokens[:, 0], split.image.tokens[:, 0], chunk=3)
    assert proba.shape == (10, 3) and torch.allclose(proba.sum(dim=1), torch.ones(10))
    torch.testing.assert_close(proba, torch.softmax(head.eval()(split.text, split.image), dim=-1))
