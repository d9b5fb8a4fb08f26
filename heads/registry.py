"""The heads by name: each head's modalities and fusion. Stands on nothing but the standard library, so the config
can validate a head name and the models can build one without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

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
