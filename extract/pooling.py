"""How an encoder's outputs become one vector per post: the cache's `text` and `image` rows.

    text   cls        the first token of the last hidden layer (BERT's [CLS], RoBERTa's and XLM-R's <s>); the paper's
           mean       the mean of the last hidden layer over the real tokens (padding masked out)
    image  cls        the model's pooler output, else its first token (DINOv2: the layer-normed CLS); the paper's
           mean       the mean of the patch tokens: the CLS and any register tokens (DINOv2 with registers) left out
           cls+mean   both, concatenated (DINOv2's own linear-probe feature; 2 x the hidden size)
    both   projected  a dual encoder's (CLIP, SigLIP) own get_text_features / get_image_features: the shared space

The cache records the choice (`text_pooling`, `image_pooling`, in its fingerprint too); the paper's image pooling keeps
its original recorded name, `cls_layernorm`, so caches made before these choices existed stay valid.
"""

from __future__ import annotations

import torch

from fusion.errors import FusionError

TEXT_POOLINGS = ("cls", "mean", "projected")
IMAGE_POOLINGS = ("cls", "mean", "cls+mean", "projected")
PROJECTED = "projected"
_RECORDED_IMAGE = {"cls": "cls_layernorm"}


class PoolingError(FusionError):
    """A pooling choice that does not apply to the encoder or the run."""


def resolve_pooling(modality: str, choice: str | None, *, dual: bool, model: str) -> str:
    """The pooling to use: `choice`, checked against the model, or the default (projected for a dual encoder)."""
    choices = TEXT_POOLINGS if modality == "text" else IMAGE_POOLINGS
    if choice is None:
        return PROJECTED if dual else "cls"
    if choice not in choices:
        raise PoolingError(f"unknown --{modality}-pooling {choice!r}: choose one of {', '.join(choices)}")
    if dual and choice != PROJECTED:
        raise PoolingError(f"--{modality}-pooling {choice}: {model} is a dual encoder (CLIP/SigLIP family), whose "
                           f"features are its own get_{modality}_features; use --{modality}-pooling projected")
    if not dual and choice == PROJECTED:
        raise PoolingError(f"--{modality}-pooling projected needs a dual encoder (CLIP/SigLIP family, with "
                           f"get_{modality}_features); {model} is not one")
    return choice


def recorded_pooling(modality: str, choice: str) -> str:
    """The name the cache records for a pooling choice."""
    return _RECORDED_IMAGE.get(choice, choice) if modality == "image" else choice


def pooling_choice(modality: str, recorded: str | None) -> str | None:
    """The choice a cache's recorded pooling name stands for (None: the cache predates the attribute)."""
    if recorded is None:
        return None
    if modality == "image":
        return {name: choice for choice, name in _RECORDED_IMAGE.items()}.get(recorded, recorded)
    return recorded


def check_token_widths(text_pooling: str, image_pooling: str) -> None:
    """--tokens puts each pooled vector in place of its sequence's token 0 (heads/features.py token_modality), so the
    pooled vector must be a token of that sequence's width and space: cls+mean (2 x width) and projected (another
    space, often another width) are refused."""
    for modality, how in (("text", text_pooling), ("image", image_pooling)):
        if how in ("cls+mean", PROJECTED):
            raise PoolingError(f"--tokens cannot be combined with --{modality}-pooling {how}: token "
                               "sequences carry the pooled vector as their first token, so it must have the tokens' "
                               "width; use cls or mean, or extract without --tokens")


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(N, L, D) last hidden layer and (N, L) mask -> (N, D)."""
    if how == "mean":
        return masked_mean(hidden, attention_mask)
    return hidden[:, 0]


def pool_image(hidden: torch.Tensor, pooler_output: torch.Tensor | None, how: str, *,
               prefix_tokens: int) -> torch.Tensor:
    """(N, P, D) last hidden layer (the CLS and `prefix_tokens - 1` register tokens first) -> (N, D) or (N, 2D)."""
    cls = pooler_output if pooler_output is not None else hidden[:, 0]
    if how == "cls":
        return cls
    patches = hidden[:, prefix_tokens:].float().mean(dim=1).to(hidden.dtype)
    return patches if how == "mean" else torch.cat([cls.to(patches.dtype), patches], dim=-1)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean over the positions where the mask is 1, summed in float32 (hidden may be bf16 under autocast)."""
    weights = attention_mask.to(torch.float32).unsqueeze(-1)
    total = (hidden.float() * weights).sum(dim=1)
    return (total / weights.sum(dim=1).clamp(min=1.0)).to(hidden.dtype)


def prefix_tokens(config) -> int:
    """Tokens before the patches in a ViT's output: the CLS, then `num_register_tokens` registers (DINOv2 with
    registers) when the model has them."""
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)
