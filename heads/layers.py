"""Stacked layers: M models of one architecture computed together, every parameter with a leading model dimension.

Weights keep nn.Linear's (out, in) layout, so model m's slice of a stacked tensor is exactly a single head's weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_init(generator: torch.Generator, out_dim: int, in_dim: int, bias: bool = True) -> list[Tensor]:
    """nn.Linear's default initialisation, U(-1/sqrt(in), 1/sqrt(in)), drawn from `generator`."""
    bound = 1.0 / math.sqrt(in_dim)
    shapes = [(out_dim, in_dim)] + ([(out_dim,)] if bias else [])
    return [(torch.rand(shape, generator=generator) * 2 - 1) * bound for shape in shapes]


def shared_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The same input (..., D) through M models' weights (M, out, D): ONE GEMM of width M*out -> (M, ..., out)."""
    models, out_dim, in_dim = weight.shape
    flat_bias = None if bias is None else bias.reshape(models * out_dim)
    y = F.linear(x, weight.reshape(models * out_dim, in_dim), flat_bias)
    return y.unflatten(-1, (models, out_dim)).movedim(-2, 0)


def stacked_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Per-model inputs (M, B, in) -> (M, B, out) with one batched matmul."""
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def dropout(x: Tensor, rates: Tensor | None, noise: Tensor | None) -> Tensor:
    """Inverted dropout with a rate per model: x (M, B, F), rates (M,), noise (B, F) uniform in [0, 1).

    The noise is shared by the models of one pass (it depends on the seed only), so a model's masks are the same
    whether it trains alone or stacked with others; rate 0 keeps every unit at scale 1.
    """
    if rates is None or noise is None:
        return x
    rates = rates.view(-1, 1, 1)
    keep = (noise >= rates).to(x.dtype) / (1 - rates)
    return x * keep


def pair_self_attention(first: Tensor, second: Tensor, qkv_weight: Tensor) -> Tensor:
    """Eq. 7 over the two-token sequence [x_1, x_2] = [first, second] (each (M, B, d)) -> both attended tokens,
    concatenated (M, B, 2d); qkv_weight (M, 3d, d) holds W_Q, W_K, W_V stacked.

    Over two keys a softmax is a sigmoid of the score difference: token i gives weight
    a_i = sigmoid(q_i.(k_1 - k_2) / sqrt(d)) = sigmoid(x_i.w) to x_1, with w = W_Q^T W_K (x_1 - x_2) / sqrt(d), and
    1 - a_i to x_2. As the weights sum to 1, its output is W_V (x_2 + a_i (x_1 - x_2)). Exactly Eq. 7, with four
    d x d products per row (w, then W_V of the two mixtures) instead of the six of Q, K and V for both tokens.
    """
    models, batch, dim = first.shape
    query_weight, key_weight, value_weight = qkv_weight.split(dim, dim=1)
    difference = first - second
    direction = torch.bmm(stacked_linear(difference, key_weight), query_weight) / math.sqrt(dim)  # w, as rows
    weight_first = torch.sigmoid(torch.stack(((first * direction).sum(-1), (second * direction).sum(-1)), dim=-1))
    mixtures = second.unsqueeze(2) + weight_first.unsqueeze(-1) * difference.unsqueeze(2)  # (M, B, 2, d)
    attended = stacked_linear(mixtures.reshape(models, batch * 2, dim), value_weight)
    return attended.reshape(models, batch, 2 * dim)


def token_cross_attention(query: Tensor, tokens: Tensor, mask: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                          key_weight: Tensor, value_weight: Tensor,
                          weights_out: list[Tensor] | None = None) -> Tensor:
    """Queries (M, B, d) attend to the other modality's tokens, kept in the encoder's feature space -> (M, B, d).

    tokens (B, L, D) are the other modality's unprojected features, mask (B, L) True = a real token; proj_weight
    (M, d, D) and proj_bias (M, d) are its projection P, b (Eqs. 1, 4); key_weight, value_weight (M, d, d) its W_K, W_V.
    With K_j = W_K (P x_j + b), q.K_j = x_j.u + q.W_K b where u = (W_K P)^T q: the second term is the same for every
    key, so it cancels in the softmax, and as the weights a_j sum to 1 the output sum_j a_j W_V (P x_j + b) is
    W_V (P (sum_j a_j x_j) + b). Exactly the attention over projected tokens, at O(L D) per row and model instead of
    O(L D d): no token is ever projected. A masked token gets exactly zero weight, whatever its values.
    weights_out: when given, the attention weights a_j (M, B, L) this call used are appended to it (explanations).
    """
    scale = 1.0 / math.sqrt(query.shape[-1])
    feature_query = torch.bmm(torch.bmm(query, key_weight), proj_weight)  # (M, B, D): u of each row and model
    scores = torch.bmm(feature_query.transpose(0, 1), tokens.transpose(1, 2)) * scale  # (B, M, L)
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))  # token 0 is always real: no row is all -inf
    weights = torch.softmax(scores, dim=-1)  # (B, M, L)
    if weights_out is not None:
        weights_out.append(weights.transpose(0, 1))
    mean_token = torch.bmm(weights, tokens).transpose(0, 1)  # (M, B, D): sum_j a_j x_j
    return stacked_linear(stacked_linear(mean_token, proj_weight, proj_bias), value_weight)
