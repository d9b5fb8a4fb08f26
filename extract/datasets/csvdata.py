"""A generic CSV: `image`, `text`, `label` columns, optional `split` and `id` (header names case-insensitive).

Labels are names (negative/neutral/positive, any case) or -1/0/1. Without a `split` column the rows are split
8:1:1, stratified and seeded. Relative image paths are resolved against the CSV file's folder.
"""

from __future__ import annotations

from pathlib import Path

from fusion.errors import DatasetError
from fusion.extract.datasets.registry import ROOTS
from fusion.extract.images import ImageFolder
from fusion.extract.datasets.samples import DatasetSamples, LabelledRow, assemble
from fusion.extract.datasets.splits import split_8_1_1
from fusion.extract.datasets.textio import CsvTable, read_csv
from fusion.labels import LABEL_INDEX, SPLIT_ALIASES, numeric_label


def load_csv(root: Path, *, seed: int = 0) -> DatasetSamples:
    path = Path(root)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not found"
        raise DatasetError(f"{path}: {what}; expected {ROOTS['csv']}")
    table = read_csv(path, ("image", "text", "label"))
    rows, given_splits = [], []
    folders: dict[Path, ImageFolder] = {}
    seen: dict[str, int] = {}
    for line, cell in table.rows:
        image_name = cell["image"].strip()
        if not image_name:
            raise table.error(line, "empty image path")
        id_ = _unique_id(table, line, cell.get("id", "").strip() or image_name, seen)
        label = parse_label(table, line, cell["label"])
        image = _resolve(path.parent, image_name, folders)
        rows.append(LabelledRow(id_, label, image, cell["text"].strip()))
        if "split" in table.columns:
            given_splits.append(_split(table, line, cell["split"]))
    splits = given_splits if "split" in table.columns else split_8_1_1([r.label for r in rows], seed)
    return assemble("csv", rows, splits, source_files=[path], text_fallbacks=table.fallbacks)


def parse_label(table: CsvTable, line: int, value: str) -> int:
    label = value.strip().lower()
    if label in LABEL_INDEX:
        return LABEL_INDEX[label]
    if (number := numeric_label(label)) is not None:
        return number
    raise table.error(line, f"unknown label {value[:40]!r} (expected negative/neutral/positive or -1/0/1)")


def _split(table: CsvTable, line: int, value: str) -> str:
    name = value.strip().lower()
    if name not in SPLIT_ALIASES:
        raise table.error(line, f"unknown split {value[:40]!r} (expected train, val or test)")
    return SPLIT_ALIASES[name]


def _unique_id(table: CsvTable, line: int, id_: str, seen: dict[str, int]) -> str:
    if id_ in seen:
        hint = "" if "id" in table.columns else "; add an id column to tell the rows apart"
        raise table.error(line, f"duplicate id {id_[:60]!r} (first on line {seen[id_]}){hint}")
    seen[id_] = line
    return id_


def _resolve(base: Path, name: str, folders: dict[Path, ImageFolder]) -> Path | None:
    """The image file for a path as written (relative to the CSV's folder), tolerant of extension/case."""
    written = Path(name).expanduser()
    path = written if written.is_absolute() else base / written
    folder = folders.setdefault(path.parent, ImageFolder(path.parent))
    return folder.resolve(path.name)
