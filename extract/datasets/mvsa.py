"""MVSA-Single and MVSA-Multi (Niu et al. 2016) with the Xu & Mao (MultiSentiNet) cleaning.

Layout: `labelResultAll.txt` (a header line, then `ID<TAB>text,image` for Single or three such annotator pairs
for Multi) beside `data/{ID}.jpg` and `data/{ID}.txt`. IDs are not contiguous, so everything keys on the ID.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from fusion.errors import DatasetError, LabelFileError
from fusion.extract.datasets.registry import ROOTS
from fusion.extract.images import ImageFolder
from fusion.extract.datasets.samples import DatasetSamples, LabelledRow, assemble
from fusion.extract.datasets.splits import split_8_1_1
from fusion.extract.datasets.textio import read_label_text
from fusion.labels import LABEL_INDEX

LABEL_FILE = "labelResultAll.txt"
ANNOTATORS = {"single": 1, "multi": 3}
NO_MAJORITY = "no_majority"
POS_NEG_CONFLICT = "pos_neg_conflict"

# (text, image) -> combined label; pos+neg is missing on purpose: such pairs are dropped.
COMBINED = {
    ("positive", "positive"): "positive",
    ("positive", "neutral"): "positive",
    ("neutral", "positive"): "positive",
    ("negative", "negative"): "negative",
    ("negative", "neutral"): "negative",
    ("neutral", "negative"): "negative",
    ("neutral", "neutral"): "neutral",
}

Pair = tuple[str, str]  # (text label, image label) of one annotator


def load_mvsa(root: Path, *, kind: str, seed: int = 0) -> DatasetSamples:
    """Read, clean (majority vote for Multi, then combine text/image labels) and split 8:1:1."""
    folder = locate(Path(root))
    label_file = folder / LABEL_FILE
    parsed = parse_label_file(label_file, kind)
    kept, cleaning = clean(parsed, kind)
    images = ImageFolder(folder / "data")
    rows = [
        LabelledRow(id_, label, images.resolve(f"{id_}.jpg"), text_file=folder / "data" / f"{id_}.txt")
        for id_, label in kept
    ]
    splits = split_8_1_1([row.label for row in rows], seed)
    return assemble(f"mvsa-{kind}", rows, splits, cleaning=cleaning, source_files=[label_file])


def locate(root: Path) -> Path:
    """The folder holding labelResultAll.txt and data/: root itself, or its only such subfolder."""
    if _is_mvsa_folder(root):
        return root
    if not root.is_dir():
        raise DatasetError(f"{root}: not found; expected {ROOTS['mvsa-single']}")
    found = sorted(child for child in root.iterdir() if _is_mvsa_folder(child))
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(f.name for f in found)
        raise DatasetError(f"{root}: holds several MVSA folders ({names}); pass one of them as --root")
    raise DatasetError(f"{root}: expected {LABEL_FILE} and data/ here or in exactly one subfolder; found neither")


def _is_mvsa_folder(folder: Path) -> bool:
    return (folder / LABEL_FILE).is_file() and (folder / "data").is_dir()


def parse_label_file(path: Path, kind: str) -> list[tuple[str, list[Pair]]]:
    """(ID, annotator pairs) per row, in file order; LabelFileError names the file and line."""
    expected = 1 + ANNOTATORS[kind]
    text, _ = read_label_text(path)
    # Only CR/LF end lines: str.splitlines() also splits at \x0b, \x0c, \x85, U+2028..., shifting line numbers.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    header = lines[0].split("\t")
    if header[0].strip().lower() != "id":
        raise _error(path, 1, f"expected a header line starting with 'ID<TAB>', found {lines[0][:60]!r}")
    rows, seen = [], {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) != expected:
            raise _error(path, number, _field_count_problem(kind, expected, len(fields)))
        id_ = fields[0].strip()
        if not id_.isdigit():
            raise _error(path, number, f"ID {id_[:40]!r} is not a number")
        if id_ in seen:
            raise _error(path, number, f"duplicate ID {id_} (first on line {seen[id_]})")
        seen[id_] = number
        rows.append((id_, [_pair(path, number, cell) for cell in fields[1:]]))
    if not rows:
        raise _error(path, 1, "no labelled rows after the header")
    return rows


def _field_count_problem(kind: str, expected: int, found: int) -> str:
    what = f"expected {expected} tab-separated fields (ID and {expected - 1} text,image label pair(s)), found {found}"
    other = next((k for k, n in ANNOTATORS.items() if n + 1 == found and k != kind), None)
    return what + (f"; is this MVSA-{other.capitalize()}?" if other else "")


def _pair(path: Path, number: int, cell: str) -> Pair:
    parts = [part.strip().lower() for part in cell.split(",")]
    if len(parts) != 2:
        raise _error(path, number, f"expected a 'text,image' label pair, found {cell[:40]!r}")
    for part in parts:
        if part not in LABEL_INDEX:
            raise _error(path, number, f"unknown label {part[:40]!r} (expected positive, neutral or negative)")
    return parts[0], parts[1]


def _error(path: Path, line: int, what: str) -> LabelFileError:
    return LabelFileError(f"{path}: line {line}: {what}")


def clean(rows: list[tuple[str, list[Pair]]], kind: str) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """Kept (ID, label) rows in file order and the count dropped for each reason."""
    dropped = Counter({NO_MAJORITY: 0} if kind == "multi" else {})
    dropped[POS_NEG_CONFLICT] += 0
    kept = []
    for id_, pairs in rows:
        label, reason = clean_row(pairs)
        if reason:
            dropped[reason] += 1
        else:
            kept.append((id_, LABEL_INDEX[label]))
    return kept, dict(dropped)


def clean_row(pairs: list[Pair]) -> tuple[str | None, str | None]:
    """(combined label, None) or (None, drop reason) for one row's annotator pairs."""
    text = majority([pair[0] for pair in pairs])
    image = majority([pair[1] for pair in pairs])
    if text is None or image is None:
        return None, NO_MAJORITY
    combined = COMBINED.get((text, image))
    return (combined, None) if combined else (None, POS_NEG_CONFLICT)


def majority(votes: list[str]) -> str | None:
    """The label more than half of the annotators give (all of one, 2 of 3), else None."""
    label, count = Counter(votes).most_common(1)[0]
    return label if 2 * count > len(votes) else None
