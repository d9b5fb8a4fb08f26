"""Where a cache's train/val/test split came from, and `--split-file`: a published split applied by id.

    fusion extract --dataset mvsa-single --root data/MVSA_Single --split-file clmlf_mvsa_single.tsv

A split file is CSV or TSV with two columns, `id,split` (an optional header line naming them), ids as the dataset's
reader names them (MVSA: the ID column; Memotion: image_name; csv: the id column or the image path) and split one of
train, val, test. It replaces the reader's split for every sample; samples it does not name are left out, and ids it
names that the data lacks are counted, both reported. An id named twice or an unknown split stops the run with the
file and line. The file's sha256 goes into the cache's attributes and, as a source file, into its fingerprint.

Every cache records its split source (`split_source`, `split_kind` attributes): seeded stratified, the official
Memotion test, Memotion's 10% holdout when the official test files are absent, a CSV's own split column, or a file.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from fusion.errors import LabelFileError
from fusion.extract.datasets.memotion import TEST_TEXTS
from fusion.extract.datasets.samples import DatasetSamples
from fusion.labels import SPLITS

FILE, STRATIFIED, CSV_COLUMN = "file", "stratified", "csv-column"
MEMOTION_OFFICIAL, MEMOTION_HOLDOUT = "memotion-official-test", "memotion-holdout"


class SplitFileError(LabelFileError):
    """A split file cannot be used: the message names the file and line."""


@dataclass(frozen=True)
class SplitFile:
    path: Path
    sha256: str
    splits: dict[str, str]  # id -> train | val | test, in file order


def read_split_file(path: Path) -> SplitFile:
    """Parse FILE (CSV, or TSV when its name ends in .tsv/.tab or its first line has a tab and no comma)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise SplitFileError(f"{path}: cannot read the split file ({error.strerror or error})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SplitFileError(f"{path}: not UTF-8 text (byte {error.start})") from None
    splits: dict[str, str] = {}
    lines: dict[str, int] = {}
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, text))
    for cells in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in cells) or (not splits and _is_header(cells)):
            continue
        id_, split = _row(path, line, cells)
        if id_ in lines:
            raise SplitFileError(f"{path}:{line}: id {id_[:60]!r} appears twice (first on line {lines[id_]})")
        splits[id_], lines[id_] = split, line
    if not splits:
        raise SplitFileError(f"{path}: no id,split rows")
    return SplitFile(path, hashlib.sha256(raw).hexdigest(), splits)


def _delimiter(path: Path, text: str) -> str:
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    first = next((line for line in text.splitlines() if line.strip()), "")
    return "\t" if "\t" in first and "," not in first else ","


def _is_header(cells: list[str]) -> bool:
    return len(cells) == 2 and cells[1].strip().lower() == "split" and cells[0].strip().lower() not in SPLITS


def _row(path: Path, line: int, cells: list[str]) -> tuple[str, str]:
    if len(cells) != 2:
        raise SplitFileError(f"{path}:{line}: expected 2 columns (id,split), found {len(cells)}")
    id_, split = cells[0].strip(), cells[1].strip().lower()
    if not id_:
        raise SplitFileError(f"{path}:{line}: empty id")
    if split not in SPLITS:
        raise SplitFileError(f"{path}:{line}: split {cells[1].strip()[:40]!r} is not train, val or test")
    return id_, split


def apply_split_file(data: DatasetSamples, split_file: SplitFile) -> DatasetSamples:
    """The samples (and the samples skipped while reading) with the file's splits, in split order; the ones the file
    does not name are left out. split_counts says how many the file and the data did not share."""
    named = split_file.splits
    present = {sample.id for sample in data.samples} | {id_ for id_, _, _ in data.skipped}
    samples = [dataclasses.replace(s, split=named[s.id]) for s in data.samples if s.id in named]
    samples.sort(key=lambda sample: SPLITS.index(sample.split))  # stable: file order within a split is kept
    skipped = [(id_, named[id_], reason) for id_, _, reason in data.skipped if id_ in named]
    counts = {"ids_in_file_not_in_data": len(set(named) - present),
              "rows_in_data_not_in_file": len(data.samples) + len(data.skipped) - len(samples) - len(skipped)}
    source = {"split_kind": FILE, "split_file": split_file.path.name, "split_file_sha256": split_file.sha256,
              "split_source": f"file {split_file.path.name} (sha256 {split_file.sha256[:16]})"}
    return dataclasses.replace(data, samples=samples, skipped=skipped, split_source=source, split_counts=counts,
                               source_files=[*data.source_files, split_file.path])


def default_split_source(data: DatasetSamples, seed: int) -> dict[str, str]:
    """The cache attributes that say how the reader split `data` (no split file)."""
    if data.name == "memotion":
        if any(Path(path).name == TEST_TEXTS for path in data.source_files):
            return {"split_kind": MEMOTION_OFFICIAL, "split_source": f"official Memotion test ({TEST_TEXTS}); "
                    f"val a seeded stratified 10% of the training pool (seed {seed})"}
        return {"split_kind": MEMOTION_HOLDOUT, "split_source": "Memotion test = a seeded stratified 10% holdout of "
                f"the training pool, the official test files being absent (seed {seed})"}
    if data.name == "csv" and _csv_has_split_column(data.source_files[0]):
        return {"split_kind": CSV_COLUMN, "split_source": f"the split column of {Path(data.source_files[0]).name}"}
    return {"split_kind": STRATIFIED, "split_source": f"seeded stratified 8:1:1 (seed {seed})"}


def _csv_has_split_column(path: Path) -> bool:
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        header = next(csv.reader(handle), [])
    return "split" in (cell.strip().lower() for cell in header)


def with_splits(data: DatasetSamples, split_file: SplitFile | None, seed: int) -> DatasetSamples:
    """`data` with its split source recorded: the file's splits applied when one is given."""
    if split_file is not None:
        return apply_split_file(data, split_file)
    return dataclasses.replace(data, split_source=default_split_source(data, seed))
