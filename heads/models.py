"""The fusion heads of the BERT-DINOv2 paper: projection (Eqs. 1, 4) -> fusion -> classifier MLP with dropout ->
3 logits.

One functional forward, `head_forward`, computes M models of one architecture at once from stacked parameters; the
single-model `Head` module (checkpoints, prediction) runs the same function with M = 1, so training and inference
share every line of the math.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn

from fusion.heads.config import FitConfig
from fusion.heads.registry import HEADS, NUM_CLASSES, HeadSpec, fused_dim
from fusion.heads.features import Modality, pooled_modality
from fusion.heads.layers import (DropoutRates, columns, dropout, linear_init, pair_self_attention, piece_linear,
                                 qkv_pieces, shared_linear, stacked_linear, token_cross_attention)

def param_shapes(spec: HeadSpec, text_dim: int, image_dim: int, proj_dim: int, hidden: int) -> dict[str, tuple]:
    """Every parameter's name and single-model shape, in a fixed order (the init draws follow it)."""
    shapes: dict[str, tuple] = {}
    for modality, in_dim in (("text", text_dim), ("image", image_dim)):
        if modality in spec.modalities:
            shapes[f"{modality}_proj.weight"] = (proj_dim, in_dim)
            shapes[f"{modality}_proj.bias"] = (proj_dim,)
    if spec.fusion == "dual_attn":  # per-modality [W_Q; W_K; W_V] for the cross-modal adjustment
        shapes["cross.text_qkv.weight"] = (3 * proj_dim, proj_dim)
        shapes["cross.image_qkv.weight"] = (3 * proj_dim, proj_dim)
    if spec.fusion in ("self_attn", "dual_attn"):  # Eq. 7: Q, K, V are the tokens "times W", so no bias
        shapes["fusion.qkv.weight"] = (3 * proj_dim, proj_dim)
    shapes["classifier.hidden.weight"] = (hidden, fused_dim(spec, proj_dim))
    shapes["classifier.hidden.bias"] = (hidden,)
    shapes["classifier.out.weight"] = (NUM_CLASSES, hidden)
    shapes["classifier.out.bias"] = (NUM_CLASSES,)
    return shapes


# Parameters a head uses in fp32 whatever the compute dtype: the output bias is added to the logits after their one
# cast to fp32, the loss's precision, so in bf16 training its gradient needs no cast either (heads/optim.py).
OUTPUT_BIAS = "classifier.out.bias"
FULL_PRECISION = (OUTPUT_BIAS,)


def stacked_pieces(shapes: dict[str, tuple]) -> dict[str, int]:
    """The parameters a trainer's stack keeps piece by piece (heads/optim.py ParamStack): each [W_Q; W_K; W_V]
    weight, whose three pieces are separate operands (layers.qkv_pieces)."""
    return {name: 3 for name in shapes if name.endswith("qkv.weight")}


def init_params(shapes: dict[str, tuple], head: str, seed: int) -> dict[str, Tensor]:
    """One model's initial weights from its own generator, seeded by the head name and the config seed."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{head}:{seed}".encode()))
    params: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith(".weight"):
            bias_name = name[: -len("weight")] + "bias"
            drawn = linear_init(generator, shape[0], shape[1], bias=bias_name in shapes)
            params[name] = drawn[0]
            if bias_name in shapes:
                params[bias_name] = drawn[1]
    return {name: params[name] for name in shapes}


def head_forward(spec: HeadSpec, params: dict[str, Tensor], text: Modality, image: Modality,
                 rates: DropoutRates | Tensor | None = None, noise: tuple[Tensor, Tensor] | None = None,
                 attention: dict[str, Tensor] | None = None) -> Tensor:
    """Logits (M, B, 3) of M stacked models, dense, in the output bias's dtype (FULL_PRECISION); rates (M,) (or made
    once, DropoutRates) and noise ((B, F), (B, hidden)) turn dropout on.
    attention: a dict that dual_attn on token sequences fills with the weights its cross-attention used, by the
    modality attended: "text" (M, B, L_text) from the image's query, "image" (M, B, L_image) from the text's."""
    fused = _FUSIONS[spec.fusion](spec, params, text, image, attention)
    fused = dropout(fused, rates, None if noise is None else noise[0])
    hidden = torch.relu(stacked_linear(fused, params["classifier.hidden.weight"], params["classifier.hidden.bias"]))
    hidden = dropout(hidden, rates, None if noise is None else noise[1])
    logits = stacked_linear(hidden, params["classifier.out.weight"])
    bias = params[OUTPUT_BIAS]
    return logits.to(bias.dtype, memory_format=torch.contiguous_format) + bias.unsqueeze(1)


def _latent(params: dict[str, Tensor], modality: str, features: Modality) -> Tensor:
    """T (Eq. 2) or V (Eq. 5): the projected token 0 -> (M, B, d). Only this token is projected, however long."""
    return shared_linear(features.tokens[:, 0], params[f"{modality}_proj.weight"], params[f"{modality}_proj.bias"])


def _concat(spec, params, text, image, attention=None) -> Tensor:
    latents = (_latent(params, "text", text), _latent(params, "image", image))
    return columns(torch.cat([columns(latent) for latent in latents], dim=1))  # stays feature-major (layers.py)


def _self_attn(spec, params, text, image, attention=None) -> Tensor:
    return pair_self_attention(_latent(params, "text", text), _latent(params, "image", image),
                               params["fusion.qkv.weight"])


def _dual_attn(spec, params, text, image, attention=None) -> Tensor:
    # T' = softmax(Q_t K_v^T / sqrt(d)) V_v and V' = softmax(Q_v K_t^T / sqrt(d)) V_t (Eqs. 8-10), then Eq. 7.
    text_latent, image_latent = _latent(params, "text", text), _latent(params, "image", image)
    text_adjusted = _cross(params, text_latent, "text", image_latent, "image", image, attention)
    image_adjusted = _cross(params, image_latent, "image", text_latent, "text", text, attention)
    return pair_self_attention(text_adjusted, image_adjusted, params["fusion.qkv.weight"])


def _cross(params: dict[str, Tensor], latent: Tensor, modality: str, other_latent: Tensor, other: str,
           other_features: Modality, attention: dict[str, Tensor] | None = None) -> Tensor:
    """One modality's latent (M, B, d) attends to the other modality's tokens -> (M, B, d); the weights it used go
    to attention[other] when a dict is given (pooled: none, a single key's weight is 1)."""
    if other_features.pooled:
        # A softmax over a single key is exactly 1, so the result is that key's value: W_Q and W_K drop out
        # (registry.pooled_dual_attn_note says so to the user).
        return piece_linear(other_latent, params[f"cross.{other}_qkv.weight"], 2)
    query_weight = qkv_pieces(params[f"cross.{modality}_qkv.weight"])[0]
    _, other_key_weight, other_value_weight = qkv_pieces(params[f"cross.{other}_qkv.weight"])
    query = stacked_linear(latent, query_weight)
    weights: list[Tensor] | None = None if attention is None else []
    attended = token_cross_attention(query, other_features.tokens, other_features.mask, params[f"{other}_proj.weight"],
                                     params[f"{other}_proj.bias"], other_key_weight, other_value_weight, weights)
    if weights:
        attention[other] = weights[0]
    return attended


def _single(spec, params, text, image, attention=None) -> Tensor:
    modality = spec.modalities[0]
    return _latent(params, modality, text if modality == "text" else image)


_FUSIONS = {"concat": _concat, "self_attn": _self_attn, "dual_attn": _dual_attn, "single": _single}


class Head(nn.Module):
    """One trained head: parameters under their `param_shapes` names (nn.Linear layout), forward = head_forward."""

    def __init__(self, spec: HeadSpec, shapes: dict[str, tuple], params: dict[str, Tensor], dropout_rate: float = 0.0):
        super().__init__()
        self.spec = spec
        self.dropout_rate = dropout_rate
        for name, shape in shapes.items():
            _register(self, name, nn.Parameter(params[name].detach().clone().reshape(shape)))

    def forward(self, text: Modality | Tensor, image: Modality | Tensor,
                attention: dict[str, Tensor] | None = None) -> Tensor:
        """Logits (B, 3); in training mode dropout draws its noise from torch's global generator. attention: filled
        as head_forward fills it, each (1, B, L) weight tensor given as (B, L)."""
        text, image = as_modality(text), as_modality(image)
        params = {name: p.unsqueeze(0) for name, p in self.named_parameters()}
        rates, noise = None, None
        if self.training and self.dropout_rate > 0:
            batch, hidden = text.tokens.shape[0], self.classifier.hidden.weight.shape[0]
            rates = torch.tensor([self.dropout_rate])
            noise = (torch.rand(batch, self.classifier.hidden.weight.shape[1]), torch.rand(batch, hidden))
        recorded: dict[str, Tensor] | None = None if attention is None else {}
        logits = head_forward(self.spec, params, text, image, rates, noise, recorded)[0]
        if recorded:
            attention.update({name: weights[0] for name, weights in recorded.items()})
        return logits


def _register(module: nn.Module, dotted: str, parameter: nn.Parameter) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    module.register_parameter(leaf, parameter)


def build_head(config: FitConfig, text_dim: int, image_dim: int, params: dict[str, Tensor] | None = None) -> Head:
    """A single head for `config` with its seeded initial weights (or `params`, e.g. a checkpoint's)."""
    spec = HEADS[config.head]
    shapes = param_shapes(spec, text_dim, image_dim, config.proj_dim, config.hidden)
    weights = init_params(shapes, config.head, config.seed) if params is None else params
    return Head(spec, shapes, weights, config.dropout)


def as_modality(features: Modality | Tensor) -> Modality:
    """(N, D) vectors are pooled features; a Modality passes through."""
    if isinstance(features, Modality):
        return features
    if features.dim() == 2:
        return pooled_modality(features)
    return Modality(features.float(), torch.ones(features.shape[:2], dtype=torch.bool))


@torch.inference_mode()
def predict_proba(head: Head, text: Modality | Tensor, image: Modality | Tensor, chunk: int = 4096) -> Tensor:
    """Class probabilities (N, 3) (negative, neutral, positive) of a head in eval mode, `chunk` rows at a time.
    Under inference_mode: no autograd records, no version counters (the probabilities are an end, never trained)."""
    was_training = head.training
    head.eval()
    text, image = as_modality(text), as_modality(image)
    rows = text.tokens.shape[0]
    parts = [torch.softmax(head(text.rows(slice(i, i + chunk)), image.rows(slice(i, i + chunk))), dim=-1)
             for i in range(0, rows, chunk)]
    head.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, NUM_CLASSES)
