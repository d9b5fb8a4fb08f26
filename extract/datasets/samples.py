"""What every dataset reader returns: labelled samples in split order, plus what was dropped and why.

Readers build one `LabelledRow` per labelled entry of the dataset's label file, compute the splits on the labels
alone, then call `assemble`, which checks the files (missing/empty image, missing text file) and reads texts.
A sample whose files are missing keeps its place in the split computation and is listed in `skipped`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fusion.extract.datasets.textio import decode_text
from fusion.labels import SPLITS

MISSING_IMAGE = "missing image file"
EMPTY_IMAGE = "empty image file"
MISSING_TEXT = "missing text file"


@dataclass(frozen=True)
class Sample:
    id: str  # the sample's id in its dataset (MVSA: the ID column; memotion: image_name; csv: id column or image)
    split: str  # "train" | "val" | "test"
    label: int  # 0 negative, 1 neutral, 2 positive
    text: str  # decoded, stripped text; "" when missing
    image: Path  # absolute path of the image file (hf: a StoredImage, read when decoded; extract/datasets/hfdata.py)


@dataclass
class DatasetSamples:
    name: str  # "memotion", "mvsa-single", "mvsa-multi", "csv"
    samples: list[Sample]  # train, then val, then test; file order within a split
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, split, reason)
    cleaning: dict[str, int] = field(default_factory=dict)  # rows dropped by the cleaning rule, per reason
    text_fallbacks: dict[str, int] = field(default_factory=dict)  # non-UTF-8 encoding used -> count
    source_files: list[Path] = field(default_factory=list)  # label files hashed into the cache fingerprint
    split_source: dict[str, str] = field(default_factory=dict)  # cache attributes saying where the split came from
    split_counts: dict[str, int] = field(default_factory=dict)  # with a split file: ids it and the data do not share
    settings: dict[str, str] = field(default_factory=dict)  # reader options that change the rows (hf: columns),
    # added to the cache's attributes and fingerprint

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]


@dataclass(frozen=True)
class LabelledRow:
    """One labelled entry before its files are checked."""

    id: str
    label: int
    image: Path | None  # None: no file under any accepted name
    text: str = ""
    text_file: Path | None = None  # when set, the text is read from this file (MVSA)


def assemble(
    name: str,
    rows: list[LabelledRow],
    splits: list[str],
    *,
    cleaning: dict[str, int] | None = None,
    source_files: list[Path] | None = None,
    text_fallbacks: Counter | None = None,
) -> DatasetSamples:
    """Check each row's files in split order (train, val, test) and build the samples."""
    if len(rows) != len(splits):
        raise ValueError(f"{len(rows)} rows but {len(splits)} split assignments")
    fallbacks = Counter(text_fallbacks or {})
    result = DatasetSamples(name, [], cleaning=dict(cleaning or {}), source_files=list(source_files or []))
    for split in SPLITS:
        for row in (r for r, s in zip(rows, splits) if s == split):
            reason = _missing_file(row)
            if reason:
                result.skipped.append((row.id, split, reason))
                continue
            text = row.text
            if row.text_file is not None:
                text, encoding = decode_text(row.text_file.read_bytes())
                if encoding != "utf-8":
                    fallbacks[encoding] += 1
            result.samples.append(Sample(row.id, split, row.label, text, row.image.absolute()))
    result.text_fallbacks = dict(sorted(fallbacks.items()))
    return result


def _missing_file(row: LabelledRow) -> str | None:
    """Why the row cannot become a sample (image checked first), or None."""
    if row.image is None or not row.image.is_file():
        return MISSING_IMAGE
    if row.image.stat().st_size == 0:
        return EMPTY_IMAGE
    if row.text_file is not None and not row.text_file.is_file():
        return MISSING_TEXT
    return None
