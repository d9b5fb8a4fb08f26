"""The stacked trainer (heads/train.py) against a plain PyTorch loop: nn.Linear modules and torch.optim.Adam, fed the
same minibatch order, dropout masks and initial weights, with the same early stopping. Several configurations train
stacked in one pass; each must match its own plain loop, epoch by epoch and in its final (best) weights. Every head is
covered: basic, self_attn, text_only, image_only, and dual_attn on pooled features and on token sequences (the plain
dual_attn projects every token and takes the softmax over the real ones, as PAPER.md's Eqs. 8-10 read; the trainer's
feature-space algebra, heads/layers.py token_cross_attention, is not used here).

The loop below is written from the trainer's documented contract (heads/train.py's module docstring): the order
generator is seeded with crc32("order:SEED") and draws one randperm per epoch; the dropout generator, crc32("dropout:
SEED"), draws (batch, fused width) then (batch, hidden) uniforms per minibatch when any model drops out; a unit is
kept where its noise >= the rate and scaled by 1/(1 - rate); focal loss averaged over the batch; the best weights on
validation are kept, training stops after `patience` epochs without improvement.
"""

import math
import zlib
from dataclasses import replace

import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn

from fusion.heads.config import FitConfig
from fusion.heads.features import Modality, SplitFeatures
from fusion.heads.models import init_params, param_shapes
from fusion.heads.registry import HEADS
from fusion.heads.train import train_many
from synthetic import gaussian_features

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"train": 150, "val": 60, "test": 40}
BASE = FitConfig(lr=3e-2, dropout=0.0, loss="focal", gamma=2.0, batch_size=32, epochs=6, patience=6,
                 metric="weighted_f1", proj_dim=8, hidden=12, seed=3)


class PlainHead(nn.Module):
    """Every head with ordinary modules; text and image are (B, L, D) token sequences with (B, L) masks, token 0 the
    pooled embedding (L = 1 for pooled features)."""

    def __init__(self, head: str, text_dim: int, image_dim: int, proj: int, hidden: int):
        super().__init__()
        self.head = head
        modalities = HEADS[head].modalities
        self.text_proj = nn.Linear(text_dim, proj) if "text" in modalities else None
        self.image_proj = nn.Linear(image_dim, proj) if "image" in modalities else None
        dual = head == "dual_attn"
        self.text_qkv = nn.Linear(proj, 3 * proj, bias=False) if dual else None  # W_Q, W_K, W_V of Eqs. 8-10
        self.image_qkv = nn.Linear(proj, 3 * proj, bias=False) if dual else None
        self.qkv = nn.Linear(proj, 3 * proj, bias=False) if head in ("self_attn", "dual_attn") else None
        self.hidden = nn.Linear(proj * len(modalities), hidden)
        self.out = nn.Linear(hidden, 3)

    def forward(self, text, image, rate: float = 0.0, noise=None):
        (text, text_mask), (image, image_mask) = text, image
        latents = [proj(x[:, 0]) for proj, x in ((self.text_proj, text), (self.image_proj, image)) if proj is not None]
        fused = torch.cat(latents, dim=-1)
        if self.head == "dual_attn":
            text_tokens, image_tokens = self.text_proj(text), self.image_proj(image)  # every token projected
            latents = [_attend(self.text_qkv(latents[0]), self.image_qkv(image_tokens), image_mask),
                       _attend(self.image_qkv(latents[1]), self.text_qkv(text_tokens), text_mask)]
        if self.qkv is not None:
            sequence = torch.stack(latents, dim=1)  # (B, 2, d)
            query, key, value = self.qkv(sequence).chunk(3, dim=-1)
            weights = torch.softmax(query @ key.transpose(1, 2) / math.sqrt(query.shape[-1]), dim=-1)
            fused = (weights @ value).flatten(1)
        hidden = torch.relu(self.hidden(_drop(fused, rate, noise, 0)))
        return self.out(_drop(hidden, rate, noise, 1))

    def named_like_fusion(self) -> dict[str, nn.Parameter]:
        names = {"text_proj": self.text_proj, "image_proj": self.image_proj, "cross.text_qkv": self.text_qkv,
                 "cross.image_qkv": self.image_qkv, "fusion.qkv": self.qkv, "classifier.hidden": self.hidden,
                 "classifier.out": self.out}
        return {f"{prefix}.{kind}": param for prefix, module in names.items() if module is not None
                for kind, param in module.named_parameters()}


def _attend(own_qkv, other_qkv, other_mask):
    """One modality's query (from its own [Q; K; V] of its latent, (B, 3d)) over the other modality's keys and values
    (from its projected tokens, (B, L, 3d)), padding masked out: softmax(Q K^T / sqrt(d)) V -> (B, d)."""
    query = own_qkv.chunk(3, dim=-1)[0]
    _, keys, values = other_qkv.chunk(3, dim=-1)
    scores = torch.einsum("bd,bld->bl", query, keys) / math.sqrt(query.shape[-1])
    scores = scores.masked_fill(~other_mask, float("-inf"))
    return torch.einsum("bl,bld->bd", torch.softmax(scores, dim=-1), values)


def _drop(x, rate: float, noise, which: int):
    if noise is None:
        return x
    return x * (noise[which] >= rate).float() / (1 - rate)


def _focal(logits, target, gamma: float):
    log_p = torch.log_softmax(logits, dim=-1).gather(1, target.unsqueeze(1)).squeeze(1)
    return (-(1 - log_p.exp()) ** gamma * log_p).mean()


def plain_loop(features, config: FitConfig, any_dropout: bool):
    """(val history, best weights, best epoch) of one config trained the ordinary way."""
    train, val = features["train"], features["val"]
    text_dim, image_dim = train.dims
    model = PlainHead(config.head, text_dim, image_dim, config.proj_dim, config.hidden)
    shapes = param_shapes(HEADS[config.head], text_dim, image_dim, config.proj_dim, config.hidden)
    initial = init_params(shapes, config.head, config.seed)  # the same initial weights
    with torch.no_grad():
        for name, param in model.named_like_fusion().items():
            param.copy_(initial[name])
    adam = torch.optim.Adam(model.parameters(), lr=config.lr)
    order = torch.Generator().manual_seed(zlib.crc32(f"order:{config.seed}".encode()))
    noise_generator = torch.Generator().manual_seed(zlib.crc32(f"dropout:{config.seed}".encode()))
    text, image, labels = (train.text.tokens, train.text.mask), (train.image.tokens, train.image.mask), train.label
    fused_width = model.hidden.in_features
    history, best, best_score, best_epoch = [], None, -math.inf, 0
    gamma = 0.0 if config.loss == "ce" else config.gamma
    for epoch in range(1, config.epochs + 1):
        permutation = torch.randperm(len(labels), generator=order)
        for start in range(0, len(labels), config.batch_size):
            rows = permutation[start:start + config.batch_size]
            noise = None
            if any_dropout:  # drawn for the pass whenever any model drops out, so every model sees the same draws
                noise = (torch.rand(len(rows), fused_width, generator=noise_generator),
                         torch.rand(len(rows), config.hidden, generator=noise_generator))
            logits = model((text[0][rows], text[1][rows]), (image[0][rows], image[1][rows]), config.dropout, noise)
            loss = _focal(logits, labels[rows], gamma)
            adam.zero_grad()
            loss.backward()
            adam.step()
        with torch.no_grad():
            predicted = model((val.text.tokens, val.text.mask), (val.image.tokens, val.image.mask)).argmax(dim=-1)
        score = f1_score(val.label, predicted, labels=[0, 1, 2], average="weighted", zero_division=0)
        history.append(score)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best = {name: param.detach().clone() for name, param in model.named_like_fusion().items()}
        if epoch - best_epoch >= config.patience:
            break
    return history, best, best_epoch


def with_tokens(features, text_length: int = 5, image_length: int = 4, seed: int = 0):
    """Each split's pooled vectors as token 0, followed by random tokens; texts get 1..text_length real tokens (the
    padding filled with large values, which the mask must keep out), images all of theirs."""
    generator = torch.Generator().manual_seed(seed)
    sequences = {}
    for name, split in features.items():
        rows, (text_dim, image_dim) = len(split), split.dims
        text = torch.cat((split.text.tokens, torch.randn(rows, text_length - 1, text_dim, generator=generator)), 1)
        image = torch.cat((split.image.tokens, torch.randn(rows, image_length - 1, image_dim, generator=generator)), 1)
        lengths = torch.randint(1, text_length + 1, (rows,), generator=generator)
        text_mask = torch.arange(text_length).unsqueeze(0) < lengths.unsqueeze(1)
        text = torch.where(text_mask.unsqueeze(-1), text, torch.full_like(text, 50.0))
        sequences[name] = SplitFeatures(Modality(text, text_mask),
                                        Modality(image, torch.ones(rows, image_length, dtype=torch.bool)), split.label)
    return sequences


@pytest.mark.parametrize("head, tokens", [("basic", False), ("self_attn", False), ("text_only", False),
                                          ("image_only", False), ("dual_attn", False), ("dual_attn", True)])
def test_stacked_trainer_equals_a_plain_pytorch_loop(head, tokens):
    features, _ = gaussian_features(SIZES, seed=1)
    if tokens:
        features = with_tokens(features)
    configs = [replace(BASE, head=head), replace(BASE, head=head, lr=1e-2, dropout=0.3),
               replace(BASE, head=head, lr=5e-3, dropout=0.5, loss="ce", patience=2)]
    results = train_many(features, configs)  # all three stacked in one pass
    for config, result in zip(configs, results):
        history, best, best_epoch = plain_loop(features, config, any_dropout=True)
        assert [entry["weighted_f1"] for entry in result.history] == pytest.approx(history, abs=1e-12), config
        assert result.best_epoch == best_epoch and result.epochs_run == len(history)
        assert set(result.state_dict) == set(best)
        for name, weight in best.items():
            torch.testing.assert_close(result.state_dict[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_the_reference_can_tell_a_different_minibatch_order():
    """The comparison is sharp enough to fail: another seed's minibatch order gives other weights."""
    features, _ = gaussian_features(SIZES, seed=1)
    config = replace(BASE, head="basic", epochs=2, patience=5)
    result = train_many(features, [config])[0]
    _, best, _ = plain_loop(features, replace(config, seed=4), any_dropout=False)
    _, same, _ = plain_loop(features, config, any_dropout=False)
    name = "classifier.out.weight"
    assert not torch.allclose(result.state_dict[name], best[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.state_dict[name], same[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_batched_adam_applies_transposed_gradients_to_the_right_elements(fused):
    """A weight used transposed gets a gradient with transposed strides; each element must still get its own."""
    from fusion.heads.optim import BatchedAdam, ParamStack, has_fused_adam

    if fused and not has_fused_adam("cpu"):
        pytest.skip("this torch has no fused CPU Adam")
    start = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    stack = ParamStack.from_models({"w": (3, 5)}, [{"w": start}])
    adam = BatchedAdam(stack, [0.1], fused=fused)
    reference = nn.Parameter(start.clone())
    torch_adam = torch.optim.Adam([reference], lr=0.1)
    for step in range(3):
        grad = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(step + 1)).transpose(1, 2)
        assert not grad.is_contiguous()
        adam.step([grad])
        reference.grad = grad[0].contiguous()
        torch_adam.step()
    torch.testing.assert_close(stack.params["w"][0].detach(), reference.detach())
