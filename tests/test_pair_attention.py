"""Eq. 7 over the two-token sequence (heads/layers.py pair_self_attention) against Q, K, V of both tokens and a
softmax, written out here: outputs and gradients, with ordinary and with saturating scores."""

from __future__ import annotations

import math

import pytest
import torch

from fusion.heads.layers import pair_self_attention, piece_linear

pytestmark = pytest.mark.usefixtures("one_thread")


def softmax_pair_attention(first, second, qkv_weight):
    """(M, B, d) twice -> (M, B, 2d): every token's query, key and value, softmax over both keys."""
    d = first.shape[-1]
    tokens = torch.stack((first, second), dim=2)  # (M, B, 2, d)
    q, k, v = (torch.einsum("mbtk,mjk->mbtj", tokens, qkv_weight[:, i * d:(i + 1) * d]) for i in range(3))
    weights = torch.softmax(torch.einsum("mbtj,mbsj->mbts", q, k) / math.sqrt(d), dim=-1)
    return torch.einsum("mbts,mbsj->mbtj", weights, v).flatten(2)


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: scores in the hundreds, one weight is 1 to float precision
def test_pair_attention_equals_softmax_attention_with_gradients(scale):
    generator = torch.Generator().manual_seed(7)
    models, batch, d = 3, 5, 16
    first, second = (torch.randn(models, batch, d, generator=generator, dtype=torch.float64) for _ in range(2))
    qkv = torch.randn(models, 3 * d, d, generator=generator, dtype=torch.float64) * scale / math.sqrt(d)
    downstream = torch.randn(models, batch, 2 * d, generator=generator, dtype=torch.float64)
    results = []
    for formula in (pair_self_attention, softmax_pair_attention):
        inputs = [t.clone().requires_grad_() for t in (first, second, qkv)]
        out = formula(*inputs)
        (out * downstream).sum().backward()
        results.append([out.detach()] + [t.grad for t in inputs])
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_the_first_token_can_take_all_the_weight():
    """Both queries score the first key far above the second (by 450 and 40 after the 1/sqrt(d)), so each token
    attends to the first only: both outputs are W_V x_1."""
    d = 4
    qkv = torch.zeros(1, 3 * d, d)
    qkv[0, :d] = torch.eye(d) * 500  # W_Q
    qkv[0, d:2 * d] = torch.eye(d)  # W_K
    qkv[0, 2 * d:] = torch.eye(d) * 2  # W_V
    first, second = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]), torch.tensor([[[0.2, 0.0, 0.0, 0.0]]])
    out = pair_self_attention(first, second, qkv)
    torch.testing.assert_close(out, torch.cat((2 * first, 2 * first), dim=-1))


@pytest.mark.parametrize("by_pieces", [False, True])  # (M, 3d, d) as saved runs hold it; (3, M, d, d) as trainers do
@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_piece_of_a_qkv_weight_gives_the_products_and_gradients_of_that_piece_alone(index, by_pieces):
    generator = torch.Generator().manual_seed(3)
    models, batch, d = 3, 5, 8
    x = torch.randn(models, batch, d, generator=generator, dtype=torch.float64)
    qkv = torch.randn(models, 3 * d, d, generator=generator, dtype=torch.float64)
    downstream = torch.randn(models, batch, d, generator=generator, dtype=torch.float64)
    ours_x, ours_qkv = x.clone().requires_grad_(), qkv.clone()
    if by_pieces:
        ours_qkv = ours_qkv.unflatten(1, (3, d)).transpose(0, 1).contiguous()
    ours_qkv.requires_grad_()
    out = piece_linear(ours_x, ours_qkv, index)
    (out * downstream).sum().backward()
    # The reference: x_b W^T with W rows index*d .. (index+1)*d of each model's [W_Q; W_K; W_V], by einsum.
    ref_x, ref_qkv = x.clone().requires_grad_(), qkv.clone().requires_grad_()
    expected = torch.einsum("mbk,mjk->mbj", ref_x, ref_qkv[:, index * d:(index + 1) * d])
    (expected * downstream).sum().backward()
    qkv_grad = ours_qkv.grad.transpose(0, 1).flatten(1, 2) if by_pieces else ours_qkv.grad
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qkv_grad, ref_qkv.grad, rtol=1e-12, atol=1e-12)  # the other pieces' are 0
