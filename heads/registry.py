"""The heads by name: each head's modalities and fusion. Stands on nothing but the standard library, so the config
can validate a head name and the models can build one without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

NUM_CLASSES = 3


@dataclass(frozen=True)
class HeadSpec:
    name: str
    modalities: tuple[str, ...]  # which projections exist ("text", "image")
    fusion: str  # "concat" | "self_attn" | "dual_attn" | "single"
    description: str


HEADS: dict[str, HeadSpec] = {spec.name: spec for spec in (
    HeadSpec("basic", ("text", "image"), "concat", "[T ; V] (Eq. 6) -> MLP"),
    HeadSpec("self_attn", ("text", "image"), "self_attn", "self-attention over [T, V] (Eq. 7) -> MLP"),
    HeadSpec("dual_attn", ("text", "image"), "dual_attn", "cross-modal attention each way (Eqs. 8-10), then Eq. 7"),
    HeadSpec("text_only", ("text",), "single", "ablation: T -> MLP"),
    HeadSpec("image_only", ("image",), "single", "ablation: V -> MLP"),
)}


def list_heads() -> list[str]:
    return list(HEADS)


def fused_dim(spec: HeadSpec, proj_dim: int) -> int:
    return proj_dim * len(spec.modalities)


POOLED_DUAL_ATTN_NOTE = ("dual_attn on pooled features is a single-key (linear) variant of cross-modal attention; "
                         "extract with --tokens and train with --tokens for real token attention")


def pooled_dual_attn_note(heads: Iterable[str], tokens: bool) -> str | None:
    """The one-line note for a fit, grid or report that trained dual_attn on pooled features, else None.

    With one key per modality the attention weight is exactly 1, so W_Q and W_K never act (heads/models.py _cross).
    """
    if tokens or not any(HEADS[head].fusion == "dual_attn" for head in heads if head in HEADS):
        return None
    return POOLED_DUAL_ATTN_NOTE
