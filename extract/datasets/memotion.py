"""Memotion 7k (SemEval-2020 Task 8, task A): overall sentiment folded to three classes.

Training pool: `memotion_dataset_7k/labels.csv` + `images/`. Official test (when downloaded, beside the
`memotion_dataset_7k/` folder): `2000_testdata.csv` (texts), `Meme_groundTruth*.csv` (labels), `2000_data/`.
Without the official test, 10% of the pool is held out as test; val is always 10% of the training rows.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fusion.errors import DatasetError
from fusion.extract.datasets.registry import ROOTS
from fusion.extract.images import ImageFolder
from fusion.extract.datasets.samples import DatasetSamples, LabelledRow, assemble
from fusion.extract.datasets.splits import split_pool
from fusion.extract.datasets.textio import CsvTable, is_html_fragment, read_csv

DATASET_DIR = "memotion_dataset_7k"
TEST_TEXTS = "2000_testdata.csv"
TEST_IMAGES = "2000_data"
TEST_LABELS_GLOB = "Meme_groundTruth*.csv"

# The five grades of overall_sentiment folded to our three classes (0 negative, 1 neutral, 2 positive).
GRADES = {"very_negative": 0, "negative": 0, "neutral": 1, "positive": 2, "very_positive": 2}
# The official test's Labels cell starts with the sentiment before the first underscore: "-1_0000_0000".
TEST_SENTIMENT = {"-1": 0, "0": 1, "1": 2}


@dataclass(frozen=True)
class OfficialTest:
    texts: Path
    labels: Path
    images: Path


def load_memotion(root: Path, *, seed: int = 0) -> DatasetSamples:
    dataset_dir = locate(Path(root))
    labels_csv = dataset_dir / "labels.csv"
    pool, fallbacks = read_pool(labels_csv, ImageFolder(dataset_dir / "images"))
    official = find_official_test(dataset_dir.parent)
    splits = split_pool([row.label for row in pool], seed, has_test=official is not None)
    rows, sources = pool, [labels_csv]
    if official is not None:
        test_rows, test_fallbacks = read_official_test(official)
        rows, sources = pool + test_rows, sources + [official.texts, official.labels]
        splits = splits + ["test"] * len(test_rows)
        fallbacks += test_fallbacks
    return assemble("memotion", rows, splits, source_files=sources, text_fallbacks=fallbacks)


def locate(root: Path) -> Path:
    """The memotion_dataset_7k folder: root/memotion_dataset_7k, or root itself."""
    for folder in (root / DATASET_DIR, root):
        if (folder / "labels.csv").is_file():
            return folder
    if not root.exists():
        raise DatasetError(f"{root}: not found; expected {ROOTS['memotion']}")
    raise DatasetError(f"{root}: expected {DATASET_DIR}/labels.csv (and images/) here, or labels.csv itself")


def caption(corrected: str, ocr: str) -> str:
    """text_corrected, else text_ocr; HTML fragments count as missing."""
    for text in (corrected.strip(), ocr.strip()):
        if text and not is_html_fragment(text):
            return text
    return ""


def read_pool(labels_csv: Path, images: ImageFolder) -> tuple[list[LabelledRow], Counter]:
    table = read_csv(labels_csv, ("image_name", "text_ocr", "text_corrected", "overall_sentiment"))
    rows = []
    for line, cell in _unique_rows(table, "image_name"):
        grade = cell["overall_sentiment"].strip().lower()
        if grade not in GRADES:
            raise table.error(line, f"unknown overall_sentiment {grade[:40]!r} (expected one of {', '.join(GRADES)})")
        name = cell["image_name"].strip()
        text = caption(cell["text_corrected"], cell["text_ocr"])
        rows.append(LabelledRow(name, GRADES[grade], images.resolve(name), text))
    return rows, table.fallbacks


def _unique_rows(table: CsvTable, key: str):
    """(line, cells) of each row; LabelFileError on an empty or repeated key."""
    seen: dict[str, int] = {}
    for line, cell in table.rows:
        name = cell[key].strip()
        if not name:
            raise table.error(line, f"empty {key}")
        if name in seen:
            raise table.error(line, f"duplicate {key} {name[:60]!r} (first on line {seen[name]})")
        seen[name] = line
        yield line, cell


def find_official_test(base: Path) -> OfficialTest | None:
    """The official test files beside memotion_dataset_7k/, None when none of them is there."""
    texts, images = base / TEST_TEXTS, base / TEST_IMAGES
    labels = sorted(base.glob(TEST_LABELS_GLOB))
    if not (texts.is_file() or images.is_dir() or labels):
        return None
    missing = [str(p.name) for p in (texts, images) if not p.exists()] + ([] if labels else [TEST_LABELS_GLOB])
    if missing:
        raise DatasetError(f"{base}: official memotion test set incomplete, missing {', '.join(missing)}")
    if len(labels) > 1:
        raise DatasetError(f"{base}: several test label files ({', '.join(p.name for p in labels)}); keep one")
    return OfficialTest(texts, labels[0], images)


def read_official_test(test: OfficialTest) -> tuple[list[LabelledRow], Counter]:
    """Rows of the ground-truth file (in its order), captions looked up in the test text file."""
    texts = read_csv(test.texts, ("image_name", "ocr_extracted_text", "corrected_text"))
    labels = read_csv(test.labels, ("image_name", "labels"))
    captions = {
        cell["image_name"].strip(): caption(cell["corrected_text"], cell["ocr_extracted_text"])
        for _, cell in _unique_rows(texts, "image_name")
    }
    images = ImageFolder(test.images)
    rows = []
    for line, cell in _unique_rows(labels, "image_name"):
        sentiment = cell["labels"].strip().split("_", 1)[0]
        if sentiment not in TEST_SENTIMENT:
            raise labels.error(line, f"Labels {cell['labels'][:40]!r} must start with -1_, 0_ or 1_")
        name = cell["image_name"].strip()
        rows.append(LabelledRow(name, TEST_SENTIMENT[sentiment], images.resolve(name), captions.get(name, "")))
    return rows, texts.fallbacks + labels.fallbacks
