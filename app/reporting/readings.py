"""The "How we read the paper" block that opens report.md and reproduction.md: each choice the paper leaves open,
in one line, with the values this run used; docs/paper.md gives the paper's words, our reading and why."""

from __future__ import annotations

import os
from pathlib import Path

PAPER_DOC = Path(__file__).resolve().parents[2] / "docs" / "paper.md"

DUAL_ATTN_VARIANTS = {
    "pooled": "dual attention (Eqs. 8-10) ran on pooled features: one key per modality, so its softmax is 1 and it "
              "is a single-key (linear) variant",
    "tokens": "dual attention (Eqs. 8-10) ran on token sequences (all BERT tokens, DINOv2's CLS and patches, padding "
              "masked): real attention",
    "both": "dual attention (Eqs. 8-10) ran twice: on token sequences (real attention) and on pooled features (one "
            "key per modality: a single-key, linear variant); both rows are shown",
}


def readings_lines(report_dir: Path, *, batch_size: int, max_length: int | None, epochs: int, patience: int,
                   hidden: int = 256, dual_attn: str | None = None) -> list[str]:
    """The block, with a link to docs/paper.md relative to the report's folder. dual_attn: "pooled", "tokens",
    "both", or None when no dual_attn head ran."""
    cut = max_length or "the cache's"
    lines = ["## How we read the paper", "",
             f"Where the paper leaves a choice open, fusion makes one; {_link(report_dir)} gives, for each, the "
             "paper's words, our reading and why.", "",
             "- Eq. 7 (self-attention) runs over the two-token sequence [T, V], so each modality attends to both; "
             "read literally on the one 512-d fused vector it would be a softmax over a single key.",
             f"- Classifier: one hidden layer of {hidden} units (ReLU), then 3 logits, where the paper says "
             "\"several fully connected layers\".",
             "- Dropout on the fused vector and on the hidden layer only.",
             f"- Batch size {batch_size}; texts cut at {cut} tokens; focal loss "
             "without α (every class weighs 1; γ 0 is cross-entropy); at most "
             f"{epochs} epochs, early stopping on the validation metric with patience {patience}."]
    if dual_attn is not None:
        lines.append(f"- The {DUAL_ATTN_VARIANTS[dual_attn]}.")
    return lines + [""]


def _link(report_dir: Path) -> str:
    if not PAPER_DOC.is_file():  # an install without the repository's docs/
        return "docs/paper.md (in the fusion repository)"
    try:
        target = os.path.relpath(PAPER_DOC, Path(report_dir).resolve())
    except ValueError:  # another drive (Windows)
        target = str(PAPER_DOC)
    return f"[docs/paper.md]({Path(target).as_posix()})"
