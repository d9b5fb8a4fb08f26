"""Focal loss (Lin et al. 2017) and cross-entropy as its gamma = 0 case, for one model or M stacked models."""

from __future__ import annotations

import torch
from torch import Tensor

# Floor for (1 - p_t) inside the power: keeps pow's gradient finite when p_t rounds to 1. At gamma 0 the factor is
# exactly 1 either way, so cross-entropy is unaffected; otherwise it only matters where the loss is ~0 anyway.
_FLOOR = 1e-12


def focal_loss_per_sample(logits: Tensor, target: Tensor, gamma: float | Tensor = 2.0,
                          alpha: Tensor | None = None) -> Tensor:
    """FL(p_t) = -alpha_t (1 - p_t)^gamma log p_t for every sample.

    logits (..., B, C) with optional leading model dimensions, target (B,) class indices. gamma: a number, or one per
    model (shape of the leading dimensions); alpha: None (all 1), per-class (C,), or per model (..., C).
    Returns (..., B).
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    index = target.expand(logits.shape[:-1]).unsqueeze(-1)
    log_p_t = log_probs.gather(-1, index).squeeze(-1)
    if isinstance(gamma, Tensor):
        gamma = gamma.unsqueeze(-1)  # one per model -> broadcast over the batch
    # 1 - p_t via expm1 stays accurate when p_t is close to 1 (1 - exp(log_p_t) would cancel to 0 early).
    modulator = torch.pow((-torch.expm1(log_p_t)).clamp_min(_FLOOR), gamma)
    loss = -modulator * log_p_t
    if alpha is not None:
        loss = loss * _alpha_t(alpha.to(logits.dtype), target)
    return loss


def focal_loss(logits: Tensor, target: Tensor, gamma: float | Tensor = 2.0, alpha: Tensor | None = None) -> Tensor:
    """The batch mean of `focal_loss_per_sample` -> one value per model (a scalar for (B, C) logits)."""
    return focal_loss_per_sample(logits, target, gamma, alpha).mean(dim=-1)


def cross_entropy(logits: Tensor, target: Tensor, alpha: Tensor | None = None) -> Tensor:
    """Focal loss with gamma 0. With alpha this is the batch MEAN of alpha_t * CE (the focal paper's weighting),
    not torch's weighted cross-entropy, which divides by the sum of the weights."""
    return focal_loss(logits, target, 0.0, alpha)


def _alpha_t(alpha: Tensor, target: Tensor) -> Tensor:
    if alpha.dim() == 1:
        return alpha[target]
    # alpha (..., C) per model: pick each sample's class weight -> (..., B)
    return alpha[..., target]
