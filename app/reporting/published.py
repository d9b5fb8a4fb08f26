"""Published numbers to set ours beside, each with the paper it comes from (tests/test_published.py pins every value).

The seed paper is *Enhancing Sentiment Analysis through Multimodal Fusion: A BERT-DINOv2 Approach*; its Table 1 gives
accuracy and F1 on MVSA-Single and MVSA-Multi for twelve models (its own three heads among them), and a figure gives
its heads' macro F1 on Memotion. F1 on MVSA is the weighted F1, the metric of the MVSA literature. Every one of these
was measured on its authors' own split, so none is like for like with a run on another split.
"""

from __future__ import annotations

from typing import NamedTuple

from fusion.extract.datasets.splitfile import MEMOTION_HOLDOUT

SEED_TABLE_1 = "Seed paper, Table 1"
SEED_MEMOTION = "Seed paper, Memotion figure"
CLMLF = "CLMLF (NAACL Findings 2022)"
MGNNS = "MGNNS (ACL 2021)"
SEMEVAL = "SemEval-2020 Task 8, task A winner"


class Published(NamedTuple):
    model: str
    accuracy: float | None
    weighted_f1: float | None
    macro_f1: float | None
    source: str
    digits: int  # as many decimals as the source gave, so .69 is not shown as a spurious 0.6900
    head: str | None = None  # our head that reimplements this model (the seed paper's own rows)


# Seed paper, Table 1: model, then accuracy and F1 on MVSA-Single, then on MVSA-Multi (None: not reported).
TABLE_1 = (
    ("SentiBank", .45, .43, .55, .51, None),
    ("SentiStrength", .49, .48, .50, .55, None),
    ("SentiBank+SentiStrength", .52, .50, .65, .55, None),
    ("HSAN", None, .66, None, .67, None),
    ("DNN-LR", .61, .61, .67, .66, None),
    ("CNN-Multi", .61, .58, .66, .64, None),
    ("MultiSentiNet-Avg", .66, .66, .67, .66, None),
    ("MultiSentiNet-Att", .69, .69, .68, .68, None),
    ("Dual-Pipeline", .57, .56, .73, .69, None),
    ("Basic", .73, .71, .68, .67, "basic"),
    ("Self-Attention", .72, .70, .68, .67, "self_attn"),
    ("Dual-Attention", .72, .71, .67, .66, "dual_attn"),
)
# Later work, for context: accuracy and weighted F1 (percent in the papers) on MVSA-Single, then MVSA-Multi.
LATER_MVSA = ((CLMLF, .7533, .7346, .7200, .6983), (MGNNS, .7377, .7270, .7249, .6934))


def _mvsa(column: int) -> tuple[Published, ...]:
    seed = tuple(Published(row[0], row[column], row[column + 1], None, SEED_TABLE_1, 2, row[5]) for row in TABLE_1)
    later = tuple(Published(row[0].split(" (")[0], row[column], row[column + 1], None, row[0], 4) for row in LATER_MVSA)
    return seed + later


PUBLISHED: dict[str, tuple[Published, ...]] = {
    "mvsa-single": _mvsa(1),
    "mvsa-multi": _mvsa(3),
    "memotion": (Published("Dual-Attention", None, None, .3552, SEED_MEMOTION, 4, "dual_attn"),
                 Published("SemEval-2020 Task 8 winner", None, None, .3547, SEMEVAL, 4)),
}


def published_for(dataset: str) -> tuple[Published, ...]:
    return PUBLISHED.get(dataset, ())


def paper_row(dataset: str, head: str) -> Published | None:
    """The seed paper's number for our `head` on `dataset`, if it published one."""
    return next((row for row in published_for(dataset) if row.head == head), None)


def split_note(cache: dict) -> str:
    """Whether published numbers compare like for like with a run on this cache's split."""
    source = cache.get("split_source")
    if cache.get("split_kind") == "file":
        return (f"This run used the split file `{cache.get('split_file')}` (sha256 "
                f"`{str(cache.get('split_file_sha256'))[:16]}`): its numbers compare like for like only with work "
                "that used the same split file; the published numbers below used their authors' own splits.")
    where = f" This run's split: {source}." if source else ""
    return ("The published numbers used their authors' own splits, so they are not like for like with this run "
            f"(they would be with the same split file, `fusion extract --split-file`).{where}")


def split_lines(cache: dict) -> list[str]:
    """Where the train/val/test split came from; in bold when Memotion's test is not the official one."""
    source = cache.get("split_source") or "not recorded (a cache written before split sources were kept)"
    lines = [f"- Splits: {source}."]
    if cache.get("split_kind") == MEMOTION_HOLDOUT:
        lines.append("- **Memotion test = a 10% holdout of the training pool, because the official test files "
                     "(2000_testdata.csv, Meme_groundTruth.csv) were absent: these test numbers are not on the "
                     "official SemEval-2020 Task 8 test set.**")
    return lines
