"""Hugging Face `datasets` as input: a folder written by `save_to_disk` (a Dataset or a DatasetDict), a folder of
Parquet files (the hub's `data/train-00000-of-00001.parquet` layout, or any *.parquet), or one Parquet file.

    fusion extract --dataset hf --root data/mvsa_hf --columns image=img,text=caption,label=sentiment

The `datasets` library reads the local path; nothing is fetched from the hub. Parquet files are converted once into
the library's own cache (HF_DATASETS_CACHE), as `datasets.load_dataset` always does, and reused from there.

Columns: `image`, `text` and `label` (these names unless --columns maps them), and optionally `id` (without it a
row's id is SPLIT/ROW, or ROW for a dataset without splits). Images: a `datasets.Image` feature (bytes or paths),
raw bytes, or path strings (relative ones against the root folder). An image's bytes stay in the dataset's
memory-mapped Arrow files until a decoding worker reads them (`StoredImage`), and are decoded with the same checks
as image files (extract/images.py load_rgb). Labels: class names (negative/neutral/positive, any case), -1/0/1, or a
`ClassLabel` with those names.

Splits: the dataset's own (train, validation|val|valid|dev, test) when it has several; a missing val or test is cut
from train (10%, stratified, seeded); a dataset with one split, or none, gets the stratified 8:1:1 split.
Bad rows are skipped with their reason, like every reader's: an empty text, an unknown label, an image that is
missing; an image that does not decode is skipped when the extraction decodes it. A row with an unknown label takes
no part in a computed split (which is stratified by label) and is listed under train.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fusion.errors import DatasetError, install_extra
from fusion.extract.datasets.registry import ROOTS
from fusion.extract.images import ImageUnreadable
from fusion.extract.datasets.samples import DatasetSamples, Sample
from fusion.extract.datasets.splits import held_out_size, holdout, split_8_1_1, split_pool
from fusion.labels import LABEL_INDEX, SPLIT_ALIASES, SPLITS, numeric_label

ROLES = ("image", "text", "label", "id")
REQUIRED = ("image", "text", "label")
EMPTY_TEXT = "empty text"
MISSING_IMAGE = "missing image"


def load_hf(root: Path, *, seed: int = 0, columns: str | None = None) -> DatasetSamples:
    mapping = parse_columns(columns)
    tables = read_tables(Path(root))
    for name, table in tables.items():
        _check_columns(root, name, table, mapping)
    base = Path(root) if Path(root).is_dir() else Path(root).parent
    rows = {name: _rows(name, table, mapping, named=len(tables) > 1, base=base) for name, table in tables.items()}
    splits = assign_splits(root, rows, seed)
    data = DatasetSamples("hf", [], source_files=source_files(Path(root)),
                          settings={"columns": ",".join(f"{role}={mapping[role]}" for role in sorted(mapping))})
    _check_unique_ids(root, [row for split_rows in rows.values() for row in split_rows])
    for split in SPLITS:
        for row in (row for row in splits if row[1] == split):
            _add(data, *row)
    if not data.samples and any(reason.startswith("unknown label") for _, _, reason in data.skipped):
        values = sorted({reason for _, _, reason in data.skipped if reason.startswith("unknown label")})[:3]
        raise DatasetError(f"{root}: no row has a known label ({'; '.join(values)}); labels must be negative/neutral/"
                           f"positive, -1/0/1, or a ClassLabel with those names")
    return data


def parse_columns(text: str | None) -> dict[str, str]:
    """`image=img,text=caption,label=sentiment[,id=post_id]` -> {role: column}; roles not given keep their name."""
    mapping = {role: role for role in REQUIRED}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        role, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not column or role not in ROLES:
            raise DatasetError(f"--columns {text!r}: expected ROLE=COLUMN pairs, ROLE one of {', '.join(ROLES)} "
                               f"(e.g. image=img,text=caption,label=sentiment)")
        mapping[role] = column
    return mapping


def read_tables(root: Path) -> dict[str, object]:
    """{split name as stored: datasets.Dataset}, read from the local path with the datasets library."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"--dataset hf needs the datasets package: {install_extra('hf')}") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if not root.exists():
        raise DatasetError(f"{root}: not found; expected {ROOTS['hf']}")
    try:
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            loaded = datasets.load_from_disk(str(root))
        elif parquet_files(root):
            loaded = datasets.load_dataset("parquet", data_files=parquet_splits(root))
        else:
            raise DatasetError(f"{root}: neither a dataset written by save_to_disk (no dataset_dict.json or "
                               f"state.json) nor Parquet files")
    except DatasetError:
        raise
    except Exception as error:  # datasets and pyarrow raise many types for an unreadable file; one line says which
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise DatasetError(f"{root}: cannot read it with the datasets library ({reason})") from error
    return dict(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else {"": loaded}


def parquet_splits(root: Path) -> dict[str, list[str]]:
    """{split: Parquet files}, the splits told by the file and folder names as the datasets library tells them
    (train-00000-of-00001.parquet, test/...); other files (images, README) are left out."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    if root.is_file():
        return {"train": [str(root)]}
    found = DataFilesDict.from_patterns(get_data_patterns(str(root)), base_path=str(root))
    splits = {split: sorted(str(f) for f in files if str(f).endswith(".parquet")) for split, files in found.items()}
    found = {split: files for split, files in splits.items() if files}
    return found or {"train": [str(f) for f in parquet_files(root)]}


def parquet_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root] if root.suffix == ".parquet" else []
    return sorted(root.rglob("*.parquet"))


def source_files(root: Path) -> list[Path]:
    """What the cache fingerprint hashes: the Parquet files, or every file save_to_disk wrote."""
    found = parquet_files(root)
    if found or root.is_file():
        return found
    return sorted(path for path in root.rglob("*") if path.is_file())


def _check_columns(root: Path, split: str, table, mapping: dict[str, str]) -> None:
    missing = [f"{role}={column}" for role, column in mapping.items() if column not in table.column_names]
    if missing:
        where = f"{root}" + (f" (split {split})" if split else "")
        raise DatasetError(f"{where}: no column for {', '.join(missing)}; its columns are "
                           f"{', '.join(table.column_names)} (map them with --columns image=...,text=...,label=...)")


@dataclass(frozen=True)
class Row:
    id: str
    label: int | None  # None: unknown, and `problem` says why
    text: str
    image: "StoredImage"
    problem: str | None  # why the row cannot become a sample (empty text, unknown label)
    stored_split: str  # the split it was stored in ("" for a dataset without splits)


def _rows(split: str, table, mapping: dict[str, str], *, named: bool, base: Path) -> list[Row]:
    """The table's rows with their labels and texts read; images left in the table."""
    texts = list(table[mapping["text"]])
    labels = _labels(table, mapping["label"])
    ids = [str(value) for value in table[mapping["id"]]] if "id" in mapping else [
        f"{split}/{i}" if named else str(i) for i in range(len(texts))]
    images = image_column(table, mapping["image"])
    rows = []
    for i, (text, (label, problem)) in enumerate(zip(texts, labels)):
        text = "" if text is None else str(text).strip()
        problem = problem or (EMPTY_TEXT if not text else None)
        rows.append(Row(ids[i], label, text, StoredImage(images, mapping["image"], i, base), problem, split))
    return rows


def _labels(table, column: str) -> list[tuple[int | None, str | None]]:
    """(label 0..2, None) or (None, why) per row."""
    feature = table.features[column]
    names = getattr(feature, "names", None)
    values = list(table[column])
    if names is not None:  # a ClassLabel: stored as indices into its names, -1 for none
        return [_label(names[v]) if isinstance(v, int) and 0 <= v < len(names) else (None, "missing label")
                for v in values]
    return [_label(value) for value in values]


def _label(value) -> tuple[int | None, str | None]:
    if value is None:
        return None, "missing label"
    if isinstance(value, str) and value.strip().lower() in LABEL_INDEX:
        return LABEL_INDEX[value.strip().lower()], None
    if (number := numeric_label(value)) is not None:
        return number, None
    return None, f"unknown label {str(value)[:40]!r}"


def assign_splits(root: Path, tables: dict[str, list[Row]], seed: int) -> list[tuple[Row, str]]:
    """(row, split) for every row: the stored splits when there are several, otherwise computed."""
    if len(tables) == 1:
        rows = next(iter(tables.values()))
        return _computed(rows, seed, lambda labels: split_8_1_1(labels, seed))
    named = {}
    for stored in tables:
        split = SPLIT_ALIASES.get(stored.lower())
        if split is None or split in named:
            why = "is not" if split is None else "repeats"
            raise DatasetError(f"{root}: split {stored!r} {why} one of train, validation (or val, valid, dev), test")
        named[split] = tables[stored]
    if "train" not in named:
        raise DatasetError(f"{root}: has splits {', '.join(tables)} but no train split")
    stored_rows = [(row, split) for split in ("val", "test") for row in named.get(split, [])]
    if "val" in named and "test" in named:
        return [(row, "train") for row in named["train"]] + stored_rows
    cut = (lambda labels: split_pool(labels, seed, has_test=True)) if "test" in named else _test_cut(seed)
    return _computed(named["train"], seed, cut) + stored_rows


def _test_cut(seed: int):
    """A train split with a val but no test: test is 10% of train, stratified."""
    def cut(labels: list[int]) -> list[str]:
        _, test = holdout(labels, held_out_size(len(labels)), seed)
        splits = ["train"] * len(labels)
        for i in test:
            splits[i] = "test"
        return splits
    return cut


def _computed(rows: list[Row], seed: int, cut) -> list[tuple[Row, str]]:
    """Rows with a label take part in the stratified cut; the others are listed under train (to be skipped)."""
    labelled = [row for row in rows if row.label is not None]
    splits = iter(cut([row.label for row in labelled]))
    return [(row, next(splits) if row.label is not None else "train") for row in rows]


def _add(data: DatasetSamples, row: Row, split: str) -> None:
    if row.problem:
        data.skipped.append((row.id, split, row.problem))
        return
    data.samples.append(Sample(row.id, split, row.label, row.text, row.image))


def _check_unique_ids(root: Path, rows: list[Row]) -> None:
    counts = Counter(row.id for row in rows)
    repeated = [sid for sid, n in counts.items() if n > 1]
    if repeated:
        raise DatasetError(f"{root}: id {repeated[0][:60]!r} appears {counts[repeated[0]]} times; ids must be unique")


def image_column(table, column: str):
    """The table with only its image column, images left undecoded (bytes and path as stored)."""
    import datasets

    images = table.select_columns([column])
    if isinstance(images.features[column], datasets.Image):
        images = images.cast_column(column, datasets.Image(decode=False))
    return images


@dataclass(frozen=True, eq=False)
class StoredImage:
    """One image of a dataset table, read when a decoding worker asks for it (extract/batches.py image_pixels)."""

    table: object  # datasets.Dataset holding the image column only, undecoded
    column: str
    row: int
    base: Path | None = None  # folder that relative image paths are relative to

    def read_image(self) -> bytes | Path:
        """The image's bytes, or the path of its file; ImageUnreadable when the row holds neither."""
        try:
            value = self.table[self.row][self.column]
        except Exception as error:  # a damaged Arrow file surfaces as any pyarrow error
            raise ImageUnreadable(f"cannot read the dataset row ({type(error).__name__})") from None
        if isinstance(value, dict):  # a datasets.Image: bytes when embedded, else the file's path
            value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str) and value.strip():
            path = Path(value).expanduser()
            return path if path.is_absolute() or self.base is None else self.base / path
        raise ImageUnreadable(MISSING_IMAGE)

