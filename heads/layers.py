"""Stacked layers: M models of one architecture computed together, every parameter with a leading model dimension.

Weights keep nn.Linear's (out, in) layout, so model m's slice of a stacked tensor is exactly a single head's weight.
A [W_Q; W_K; W_V] weight comes stacked as (M, 3d, d), or piece by piece as (3, M, d, d) (qkv_pieces).

Layout: the functions take and return activations as (M, B, F), but compute them feature-major. A product is
computed as W X^T, so its result lies in memory as (M, F, B) and is returned as the transposed view (`columns` of
it is dense again), and a function handed such a view computes on (M, F, B). So every product multiplies the weights
as they are stored, every weight gradient leaves its product dense, and the elementwise work between products runs
over dense memory: no activation, gradient or weight is copied into another layout, in fp32 or in bf16 (whose matrix
kernels copy any operand that is not dense). benchmarks/step_profile.py counts the copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def linear_init(generator: torch.Generator, out_dim: int, in_dim: int, bias: bool = True) -> list[Tensor]:
    """nn.Linear's default initialisation, U(-1/sqrt(in), 1/sqrt(in)), drawn from `generator`."""
    bound = 1.0 / math.sqrt(in_dim)
    shapes = [(out_dim, in_dim)] + ([(out_dim,)] if bias else [])
    return [(torch.rand(shape, generator=generator) * 2 - 1) * bound for shape in shapes]


def columns(x: Tensor) -> Tensor:
    """(M, B, F) activations as (M, F, B), a column per row: a view, dense for what this module returns."""
    return x.transpose(-1, -2)


def qkv_pieces(qkv_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """W_Q, W_K, W_V (each (M, d, d)) of a stacked (M, 3d, d) weight, or of one stacked piece by piece, (3, M, d, d)
    (heads/optim.py ParamStack), whose pieces are dense."""
    if qkv_weight.dim() == 4:
        return qkv_weight.unbind(0)
    return qkv_weight.split(qkv_weight.shape[-1], dim=1)


def shared_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The same input (..., D) through M models' weights (M, out, D): ONE GEMM of width M*out -> (M, ..., out)."""
    models, out_dim, in_dim = weight.shape
    rows = x.reshape(-1, in_dim)
    y = torch.mm(weight.reshape(models * out_dim, in_dim), rows.T)  # (M*out, N): the first layer's weight as stored
    if bias is not None:
        y.add_(bias.reshape(-1, 1))  # in place: the product keeps only its inputs for its backward
    return y.view(models, out_dim, *x.shape[:-1]).movedim(1, -1)


def stacked_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Per-model inputs (M, B, in) -> (M, B, out) with one batched matmul, W X^T."""
    y = torch.bmm(weight, columns(x))
    if bias is not None:
        y.add_(bias.unsqueeze(-1))
    return columns(y)


def piece_linear(x: Tensor, qkv_weight: Tensor, index: int) -> Tensor:
    """stacked_linear(x, W) with W the piece `index` (0, 1, 2: W_Q, W_K, W_V) of a weight qkv_pieces reads, whose
    gradient is written straight into its place in the whole weight's, the other pieces' zeroed: through qkv_pieces
    autograd would stack all three pieces' gradients, zeros included, in a pass of its own."""
    return columns(_PieceProduct.apply(columns(x), qkv_weight, index))


class _PieceProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, qkv_weight: Tensor, index: int) -> Tensor:
        ctx.save_for_backward(x, qkv_weight)
        ctx.index = index
        return torch.bmm(qkv_pieces(qkv_weight)[index], x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, qkv_weight = ctx.saved_tensors
        x_grad = weight_grad = None
        if ctx.needs_input_grad[0]:
            x_grad = torch.bmm(qkv_pieces(qkv_weight)[ctx.index].transpose(1, 2), grad)
        if ctx.needs_input_grad[1]:
            weight_grad = torch.empty_like(qkv_weight)
            pieces = qkv_pieces(weight_grad)
            for other, piece in enumerate(pieces):
                if other != ctx.index:
                    piece.zero_()
            torch.bmm(grad, x.transpose(1, 2), out=pieces[ctx.index])
        return x_grad, weight_grad, None


@dataclass(frozen=True)
class DropoutRates:
    """Per-model dropout rates as dropout reads them, made once (a trainer's epoch), not per step: the distinct rates
    (R, 1, 1), the kept units' scale 1 / (1 - rate) of each (R, 1, 1) in the compute dtype, and which of them each
    model has (M,)."""
    levels: Tensor
    scales: Tensor
    which: Tensor

    @classmethod
    def of(cls, rates: Tensor, dtype: torch.dtype) -> "DropoutRates":
        levels, which = torch.unique(rates, return_inverse=True)
        return cls(levels.view(-1, 1, 1), (1 / (1 - levels)).to(dtype).view(-1, 1, 1), which)


def dropout(x: Tensor, rates: DropoutRates | Tensor | None, noise: Tensor | None) -> Tensor:
    """Inverted dropout with a rate per model: x (M, B, F), rates (M,) or made once (DropoutRates), noise (B, F)
    uniform in [0, 1); a unit is kept, at scale 1 / (1 - rate), where its noise >= the rate.

    The noise is shared by the models of one pass (it depends on the seed only), so a model's masks are the same
    whether it trains alone or stacked with others; rate 0 keeps every unit at scale 1. As the masks differ only by
    rate, each distinct rate's is made once, at its scale, in x's layout, and gathered for the models (a grid has a
    few rates for dozens of models): then one product applies them, and one their gradient.
    """
    if rates is None or noise is None:
        return x
    if isinstance(rates, Tensor):
        rates = DropoutRates.of(rates, x.dtype)
    units = columns(x)
    kept = torch.empty((len(rates.levels), *units.shape[1:]), dtype=torch.bool, device=x.device)
    torch.ge(columns(noise), rates.levels, out=kept)
    return columns(units * torch.where(kept, rates.scales, 0).index_select(0, rates.which))


def pair_self_attention(first: Tensor, second: Tensor, qkv_weight: Tensor) -> Tensor:
    """Eq. 7 over the two-token sequence [x_1, x_2] = [first, second] (each (M, B, d)) -> both attended tokens,
    concatenated (M, B, 2d); qkv_weight holds W_Q, W_K, W_V (qkv_pieces).

    Over two keys a softmax is a sigmoid of the score difference: token i gives weight
    a_i = sigmoid(q_i.(k_1 - k_2) / sqrt(d)) = sigmoid(x_i.w / sqrt(d)) to x_1, with w = W_Q^T W_K (x_1 - x_2), and
    1 - a_i to x_2. As the weights sum to 1, its output is W_V (x_2 + a_i (x_1 - x_2)) = W_V x_2 + a_i W_V (x_1 - x_2).
    Exactly Eq. 7, with four d x d products per row (w, then W_V of x_2 and of the difference) instead of the six
    of Q, K and V for both tokens.
    """
    x1 = columns(first)
    models, dim, batch = x1.shape
    attended = _PairAttention.apply(x1, columns(second), qkv_weight)
    return columns(attended.view(models, 2 * dim, batch))


class _PairAttention(torch.autograd.Function):
    """pair_self_attention on columns: x_1, x_2 (M, d, B) and [W_Q; W_K; W_V] -> (M, 2, d, B) (token, feature, row).
    Its gradient is written out: autograd's would make each elementwise step of it a pass over memory of its own,
    add up the parts of the gradients of x_2, the difference and w in passes of their own, and stack the three
    weight gradients into a fourth; here most parts are summed in the multiply-adds (addcmul), and the products
    write the weight gradients in place."""

    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, qkv_weight: Tensor):
        query_weight, key_weight, value_weight = qkv_pieces(qkv_weight)
        difference = x1 - x2
        keyed = torch.bmm(key_weight, difference)
        direction = torch.bmm(query_weight.transpose(1, 2), keyed)  # w, a column per row
        scores = torch.stack(((x1 * direction).sum(1), (x2 * direction).sum(1)), dim=1)  # (M, 2, B)
        weight_first = saturated(torch.sigmoid(scores / math.sqrt(x1.shape[1])))
        value_difference = torch.bmm(value_weight, difference)
        attended = torch.addcmul(torch.bmm(value_weight, x2).unsqueeze(1), weight_first.unsqueeze(2),
                                 value_difference.unsqueeze(1))
        ctx.save_for_backward(x1, x2, qkv_weight, difference, keyed, direction, weight_first, value_difference)
        return attended

    @staticmethod
    def backward(ctx, grad: Tensor):
        x1, x2, qkv_weight, difference, keyed, direction, weight_first, value_difference = ctx.saved_tensors
        query_weight, key_weight, value_weight = qkv_pieces(qkv_weight)
        first_grad, second_grad = grad.unbind(1)
        weight_of = (weight_first[:, :1], weight_first[:, 1:])  # a_1, a_2 as (M, 1, B)
        # attended_i = W_V x_2 + a_i W_V (x_1 - x_2)
        value_second_grad = first_grad + second_grad
        value_difference_grad = torch.addcmul(first_grad * weight_of[0], second_grad, weight_of[1])
        weight_grad = (grad * value_difference.unsqueeze(1)).sum(2)  # (M, 2, B)
        # a_i = sigmoid(x_i.w / sqrt(d))
        score_grad = weight_grad * weight_first * (1 - weight_first) / math.sqrt(x1.shape[1])
        score_of = (score_grad[:, :1], score_grad[:, 1:])
        direction_grad = torch.addcmul(x1 * score_of[0], x2, score_of[1])
        keyed_grad = torch.bmm(query_weight, direction_grad)
        difference_grad = torch.bmm(key_weight.transpose(1, 2), keyed_grad)
        difference_grad += torch.bmm(value_weight.transpose(1, 2), value_difference_grad)
        first = torch.addcmul(difference_grad, direction, score_of[0])
        second = torch.bmm(value_weight.transpose(1, 2), value_second_grad).addcmul_(direction, score_of[1])
        second -= difference_grad
        qkv_grad = torch.empty_like(qkv_weight)
        query_weight_grad, key_weight_grad, value_weight_grad = qkv_pieces(qkv_grad)
        torch.bmm(keyed, direction_grad.transpose(1, 2), out=query_weight_grad)
        torch.bmm(keyed_grad, difference.transpose(1, 2), out=key_weight_grad)
        torch.bmm(value_second_grad, x2.transpose(1, 2), out=value_weight_grad)
        value_weight_grad += torch.bmm(value_difference_grad, difference.transpose(1, 2))
        return first, second, qkv_grad


# Denormal numbers (below about 1e-38 in fp32 and bf16) are multiplied about a hundred times slower by x86 CPUs
# (unless every thread flushes them, which torch.set_flush_denormal does for the calling thread only): a few of them
# among a product's operands made whole training steps 20-30% slower. They arose where a tiny attention weight or a
# tiny loss gradient was multiplied on; both are cut at NEGLIGIBLE, the square root of the smallest normal number,
# where nothing is lost (saturated, without_tiny_gradients).
def negligible(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny ** 0.5


def saturated(weights: Tensor) -> Tensor:
    """Attention weights below negligible (about 1e-19) set to 0: such a weight is lost in the rounding of any sum it
    scales. A weight near 1 needs nothing: 1 - a is then 0 or normal."""
    return torch.nn.functional.threshold(weights, negligible(weights.dtype), 0.0)


def without_tiny_gradients(x: Tensor) -> Tensor:
    """x, whose gradient entries below negligible (about 1e-19) are set to 0 on the way back. Such a gradient cannot
    move Adam: its square underflows, so eps (1e-8) rules the step's denominator and the step is below lr * 1e-11.
    Applied to the logits, where a confident sample's focal-loss gradient can be that small."""
    return _WithoutTinyGradients.apply(x)


class _WithoutTinyGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return torch.where(grad.abs() < negligible(grad.dtype), 0, grad)


def token_cross_attention(query: Tensor, tokens: Tensor, mask: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                          key_weight: Tensor, value_weight: Tensor,
                          weights_out: list[Tensor] | None = None) -> Tensor:
    """Queries (M, B, d) attend to the other modality's tokens, kept in the encoder's feature space -> (M, B, d).

    tokens (B, L, D) are the other modality's unprojected features, mask (B, L) True = a real token; proj_weight
    (M, d, D) and proj_bias (M, d) are its projection P, b (Eqs. 1, 4); key_weight, value_weight (M, d, d) its W_K, W_V.
    With K_j = W_K (P x_j + b), q.K_j = x_j.u + q.W_K b where u = (W_K P)^T q: the second term is the same for every
    key, so it cancels in the softmax, and as the weights a_j sum to 1 the output sum_j a_j W_V (P x_j + b) is
    W_V (P (sum_j a_j x_j) + b). Exactly the attention over projected tokens, at O(L D) per row and model instead of
    O(L D d): no token is ever projected. A masked token gets exactly zero weight, whatever its values. The softmax
    is taken in fp32 at least, whatever the compute dtype.
    weights_out: when given, the attention weights a_j (M, B, L) this call used are appended to it (explanations).
    """
    scale = 1.0 / math.sqrt(query.shape[-1])
    feature_query = torch.bmm(torch.bmm(query, key_weight), proj_weight)  # (M, B, D): u of each row and model
    scores = torch.bmm(feature_query.transpose(0, 1), tokens.transpose(1, 2)) * scale  # (B, M, L)
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))  # token 0 is always real: no row is all -inf
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(tokens.dtype)
    if weights_out is not None:
        weights_out.append(weights.transpose(0, 1))
    mean_token = torch.bmm(weights, tokens).transpose(0, 1)  # (M, B, D): sum_j a_j x_j
    return stacked_linear(stacked_linear(mean_token, proj_weight, proj_bias), value_weight)
