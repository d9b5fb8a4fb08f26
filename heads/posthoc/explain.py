"""A prediction explained by the head itself: what it says from each modality alone, and where its token attention
went. Everything comes from head passes over features the caller already has: no encoder runs again.

- text_only / image_only: the head's logits with the other modality replaced by its mean pooled embedding over the
  training split (stored with the run at fit time): two extra head passes for the whole batch.
- attention: for dual_attn on token sequences, the weights its cross-attention used in the fused pass itself
  (heads/models.py fills them from heads/layers.py token_cross_attention), by the modality attended.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusion.heads.features import Modality, pooled_modality
from fusion.heads.models import Head


@torch.no_grad()
def explained_logits(head: Head, text: Modality, image: Modality, means: dict[str, Tensor]) -> dict:
    """{"fused", "text_only", "image_only"}: logits (B, 3); "attention": {"text": (B, L_text), "image": (B, L_image)}
    for dual_attn on token sequences, else {}. `means`: the run's training means, {"text": (D_text,), ...}."""
    attention: dict[str, Tensor] = {}
    fused = head(text, image, attention)
    rows = text.tokens.shape[0]
    return {"fused": fused,
            "text_only": head(text, _standing_in(means["image"], rows, image.tokens)),
            "image_only": head(_standing_in(means["text"], rows, text.tokens), image),
            "attention": attention}


def _standing_in(mean: Tensor, rows: int, like: Tensor) -> Modality:
    """The mean embedding as every row's one-token (pooled) modality, on the device of the features it replaces."""
    return pooled_modality(mean.to(like.device, torch.float32).expand(rows, -1))
