"""Published numbers to set ours beside, each with the paper it comes from, the kind of F1 it reports and the split it
was measured on (tests/test_published.py pins every value).

The seed paper is *Enhancing Sentiment Analysis through Multimodal Fusion: A BERT-DINOv2 Approach* (Zhao et al.,
arXiv:2503.07943, 2025). Its Table 1 gives accuracy and F1 on MVSA-Single and MVSA-Multi for twelve models (its own
three heads among them) without saying which F1 (macro or weighted) any of them is, so those rows say "F1 (kind not
stated)". Its Table 2 (section 4.1.2) gives its best Memotion macro F1, 0.3552. Later work reports the weighted F1 of
the MVSA literature. Where a paper released its split, the rows that used it compare like for like with a run on that
split (`fusion reproduce --split-file NAME=PATH`, the file named after the split as PUBLISHED_SPLITS says); every other
row was measured on its authors' own split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from fusion.extract.datasets.splitfile import FILE, MEMOTION_HOLDOUT, MEMOTION_OFFICIAL

SEED_TABLE_1 = "Seed paper (Zhao et al., arXiv:2503.07943, 2025), Table 1"
SEED_TABLE_2 = "Seed paper (Zhao et al., arXiv:2503.07943, 2025), Table 2 (§4.1.2)"
CLMLF = "CLMLF: Li et al., Findings of NAACL 2022 (arXiv:2204.05515; github.com/Link-Li/CLMLF)"
MGNNS = "MGNNS: Yang et al., ACL-IJCNLP 2021, pp. 328-339 (doi:10.18653/v1/2021.acl-long.28)"
MDSE = "MDSE: Li et al., ICASSP 2024 (IEEE doc. 10445820); values from github.com/royal-dargon/MDSE README"
SEMEVAL = ("IITK (Keswani et al.), SemEval-2020 Task 8 task A winner, SemEval 2020 pp. 1135-1140 "
           "(doi:10.18653/v1/2020.semeval-1.150)")

WEIGHTED, NOT_STATED, MACRO = "weighted", "kind not stated", "macro"


@dataclass(frozen=True)
class PublishedSplit:
    """A split its authors released: a run on the same split compares like for like with the rows that used it."""
    name: str  # a --split-file's stem that names it (case and _ or - aside), or the split kind a cache records
    description: str


CLMLF_SPLIT_NOTE = ("CLMLF's released split (github.com/Link-Li/CLMLF, dataset/data/{folder}/10-flod-1/"
                    "train|dev|test.json); MDSE's code reads the same files")
PUBLISHED_SPLITS = {
    "clmlf-mvsa-single": PublishedSplit("clmlf-mvsa-single", CLMLF_SPLIT_NOTE.format(folder="MVSA-single")),
    "clmlf-mvsa-multi": PublishedSplit("clmlf-mvsa-multi", CLMLF_SPLIT_NOTE.format(folder="MVSA-multiple")),
    MEMOTION_OFFICIAL: PublishedSplit(MEMOTION_OFFICIAL, "the official SemEval-2020 Task 8 test set "
                                      "(2000_testdata.csv with Meme_groundTruth.csv)"),
}


KNOWN_SPLITS = ("Released splits are recognised by the name of the split file given with `--split-file` "
                "(clmlf-mvsa-single, clmlf-mvsa-multi: CLMLF's, which MDSE also used), and Memotion's official test "
                "set when its files are beside the training data.")


class Published(NamedTuple):
    model: str
    accuracy: float | None
    f1: float | None  # the F1 the source reports; f1_kind says which (MVSA: set beside our weighted F1)
    macro_f1: float | None
    source: str
    digits: int  # as many decimals as the source gave, so .69 is not shown as a spurious 0.6900
    head: str | None = None  # our head that reimplements this model (the seed paper's own rows)
    f1_kind: str | None = None  # WEIGHTED or NOT_STATED; None when no F1 column is reported
    split: str | None = None  # a PUBLISHED_SPLITS name when the source used a released split; None: its own split

    def value(self, metric: str) -> float | None:
        """The number to set beside our `metric`: MVSA's F1 column sits beside our weighted F1."""
        return {"accuracy": self.accuracy, "weighted_f1": self.f1, "macro_f1": self.macro_f1}[metric]

    @property
    def f1_label(self) -> str:
        return "–" if self.f1_kind is None else f"F1 ({self.f1_kind})"


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
# Later work: model, source, accuracy and weighted F1 (percent in the papers) on MVSA-Single, then MVSA-Multi, and
# whether it used CLMLF's released split. All three are in MDSE's README table under "W-F1"; CLMLF's own code
# (test_process.py) logs F1(weighted).
LATER_MVSA = (("CLMLF", CLMLF, .7533, .7346, .7200, .6983, True),
              ("MGNNS", MGNNS, .7377, .7270, .7249, .6934, False),
              ("MDSE", MDSE, .7622, .7571, .7231, .7012, True))


def _mvsa(column: int, dataset: str) -> tuple[Published, ...]:
    seed = tuple(Published(row[0], row[column], row[column + 1], None, SEED_TABLE_1, 2, row[5], NOT_STATED)
                 for row in TABLE_1)
    later = tuple(Published(row[0], row[column + 1], row[column + 2], None, row[1], 4, None, WEIGHTED,
                            f"clmlf-{dataset}" if row[6] else None) for row in LATER_MVSA)
    return seed + later


PUBLISHED: dict[str, tuple[Published, ...]] = {
    "mvsa-single": _mvsa(1, "mvsa-single"),
    "mvsa-multi": _mvsa(3, "mvsa-multi"),
    "memotion": (Published("Dual-Attention", None, None, .3552, SEED_TABLE_2, 4, "dual_attn"),
                 Published("SemEval-2020 Task 8 winner", None, None, .3547, SEMEVAL, 4, split=MEMOTION_OFFICIAL)),
}


def published_for(dataset: str) -> tuple[Published, ...]:
    return PUBLISHED.get(dataset, ())


def paper_row(dataset: str, head: str) -> Published | None:
    """The seed paper's number for our `head` on `dataset`, if it published one."""
    return next((row for row in published_for(dataset) if row.head == head), None)


def run_split(cache: dict) -> str | None:
    """The PUBLISHED_SPLITS name of the split a cache was made with, or None (a split of our own)."""
    if cache.get("split_kind") == FILE:
        stem = Path(str(cache.get("split_file") or "")).stem.lower().replace("_", "-")
        return stem if stem in PUBLISHED_SPLITS else None
    return MEMOTION_OFFICIAL if cache.get("split_kind") == MEMOTION_OFFICIAL else None


def like_for_like(row: Published, cache: dict) -> bool:
    """Whether `row` was measured on the split of this cache (its published split, by name)."""
    return row.split is not None and row.split == run_split(cache)


def split_note(cache: dict) -> str:
    """Whether published numbers compare like for like with a run on this cache's split."""
    split = run_split(cache)
    if split is not None:
        return (f"This run's split is {PUBLISHED_SPLITS[split].description}: the rows marked 'yes' under 'same "
                "split' were measured on it and compare like for like; the others used their authors' own splits.")
    if cache.get("split_kind") == FILE:
        return (f"This run used the split file `{cache.get('split_file')}` (sha256 "
                f"`{str(cache.get('split_file_sha256'))[:16]}`), which is none of the published splits: no published "
                f"number below is like for like with it. {KNOWN_SPLITS}")
    where = f" This run's split: {cache['split_source']}." if cache.get("split_source") else ""
    return ("Not like for like: the published numbers used their authors' own splits, and this run used none of "
            f"them.{where} {KNOWN_SPLITS}")


def split_lines(cache: dict, split_counts: dict | None = None) -> list[str]:
    """Where the train/val/test split came from (a split file with its sha256 prefix and, when known, the ids the
    file and the data do not share); in bold when Memotion's test is not the official one."""
    source = cache.get("split_source") or "not recorded (a cache written before split sources were kept)"
    lines = [f"- Splits: {source}."]
    if cache.get("split_kind") == FILE and split_counts:
        missing = split_counts.get("ids_in_file_not_in_data", 0)
        left_out = split_counts.get("rows_in_data_not_in_file", 0)
        lines.append(f"- Split file `{cache.get('split_file')}`: {_count(missing, 'id')} of the file not found in the "
                     f"data, {_count(left_out, 'row')} of the data not in the file (left out).")
    if cache.get("split_kind") == MEMOTION_HOLDOUT:
        lines.append("- **Memotion test = a 10% holdout of the training pool, because the official test files "
                     "(2000_testdata.csv, Meme_groundTruth.csv) were absent: these test numbers are not on the "
                     "official SemEval-2020 Task 8 test set.**")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
