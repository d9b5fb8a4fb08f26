"""Tiny datasets in each real on-disk format (as docs/data.md describes them), dirty cases included, for the tests.

Every writer returns an `Expected` worked out from what it wrote (the rows' intended outcome), never by calling
the readers, so tests can compare the readers against it:

    exp = write_mvsa(tmp_path, kind="multi", n_per_class=4, seed=0, dirty=True)
    data = load_dataset("mvsa-multi", exp.root)
    assert data.cleaning == exp.cleaning and {s.id for s in data.samples} == exp.sample_ids
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

LABELS = ("negative", "neutral", "positive")
NOT_AN_IMAGE = "not an image (cannot identify image file)"
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP",
           ".gif": "GIF"}
# Texts whose bytes are not UTF-8, with the encoding the reader reports for them (latin-1 bytes of accented
# letters are valid cp1252, the superset, so they are reported as cp1252).
LATIN1_TEXT = ("Café au lait à Paris, très bon", "latin-1", "cp1252")
CP1252_TEXT = ("It’s “great” — really", "cp1252", "cp1252")
GBK_TEXT = ("今天天气很好，心情愉快", "gbk", "gb18030")


@dataclass
class Expected:
    root: Path  # what to pass as --root
    labels: dict[str, int]  # every id the cleaning rule keeps (read or skipped) -> label 0/1/2
    texts: dict[str, str] = field(default_factory=dict)  # id -> text the reader must give (samples only)
    skipped: dict[str, str] = field(default_factory=dict)  # id -> reason
    cleaning: dict[str, int] = field(default_factory=dict)
    text_fallbacks: dict[str, int] = field(default_factory=dict)
    fixed_splits: dict[str, str] = field(default_factory=dict)  # ids whose split the files fix
    truncated: set[str] = field(default_factory=set)  # images cut short that still load
    unreadable: dict[str, str] = field(default_factory=dict)  # id -> reason load_rgb gives
    label_files: list[Path] = field(default_factory=list)

    @property
    def sample_ids(self) -> set[str]:
        return set(self.labels) - set(self.skipped)

    def class_counts(self) -> Counter:
        return Counter(self.labels.values())


# ---------------------------------------------------------------- images


def write_image(path: Path, index: int = 0, *, size: tuple[int, int] = (20, 24)) -> Path:
    """A small real image in the format its extension says, coloured by `index` (noise keeps JPEGs > 1 KB)."""
    rng = np.random.default_rng(index)
    colour = np.array([(index * 67) % 256, (index * 131 + 80) % 256, (index * 29 + 160) % 256])
    pixels = np.clip(colour + rng.integers(-40, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, FORMATS[path.suffix.lower()])
    return path


def write_truncated(path: Path, index: int = 0) -> Path:
    """A JPEG/PNG cut halfway through its pixel data: past the header, so it loads with the rest filled in."""
    data = write_image(path, index).read_bytes()
    start = data.find(b"\xff\xda" if data.startswith(b"\xff\xd8") else b"IDAT")
    assert start > 0, "write_truncated makes JPEG or PNG files"
    path.write_bytes(data[: start + (len(data) - start) // 2])
    return path


def write_bad_image(path: Path, kind: str) -> str | None:
    """A dirty image file: "empty" (0 bytes) or "garbage" (text bytes); returns what load_rgb will say."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"" if kind == "empty" else b"this is not an image\n")
    return None if kind == "empty" else NOT_AN_IMAGE


# ---------------------------------------------------------------- memotion

MEMOTION_HEADER = ["", "image_name", "text_ocr", "text_corrected", "humour", "sarcasm", "offensive",
                   "motivational", "overall_sentiment"]
GRADES = {0: ("negative", "very_negative"), 1: ("neutral",), 2: ("positive", "very_positive")}
HTML = '<html><head><meta content="text/html; charset=UTF-8" http-equiv="content-type"><style>p{}</style>'
EXTENSIONS = ("jpg", "png", "jpeg", "JPG", "bmp", "jpe", "PNG")


def write_memotion(root: Path, *, n_per_class: int = 4, seed: int = 0, dirty: bool = True,
                   official_test: bool = False, n_test_per_class: int = 2) -> Expected:
    """root/memotion_dataset_7k/{labels.csv, images/} and, with official_test, the test files beside it."""
    assert not dirty or n_per_class >= 4, "the dirty cases need 12 rows"
    folder = root / "memotion_dataset_7k"
    rng = np.random.default_rng(seed)
    classes = rng.permutation([c for c in range(3) for _ in range(n_per_class)])
    exp = Expected(root=root, labels={}, label_files=[folder / "labels.csv"])
    rows = []
    for i, label in enumerate(classes):
        name = f"image_{i + 1}.{EXTENSIONS[i % len(EXTENSIONS)] if dirty else 'jpg'}"
        ocr, corrected = f"OCR {i} TEXT", f"meme {i}, caption {LABELS[label]}"
        exp.labels[name], exp.texts[name] = int(label), corrected
        image = folder / "images" / name
        if dirty:
            ocr, corrected, image = _dirty_memotion_row(i, name, ocr, corrected, image, exp)
        if image is not None:
            write_image(image, i)
        grade = GRADES[label][i % len(GRADES[label])]
        rows.append([str(i), name, ocr, corrected, "funny", "general", "not_offensive", "motivational", grade])
    _write_csv_rows(folder / "labels.csv", MEMOTION_HEADER, rows)
    for name in exp.skipped:
        exp.texts.pop(name)
    if official_test:
        _write_memotion_test(root, n_test_per_class, rng, exp)
    return exp


def _dirty_memotion_row(i: int, name: str, ocr: str, corrected: str, image: Path, exp: Expected):
    """The dirty case of row i (rows 0..10); returns (ocr, corrected, image file to write or None)."""
    if i == 0:
        corrected, exp.texts[name] = "", ocr  # empty text_corrected: falls back to text_ocr
    elif i == 1:
        corrected, exp.texts[name] = HTML + " meme", ocr  # HTML fragment: missing
    elif i == 2:
        ocr, corrected, exp.texts[name] = HTML, "  ", ""  # nothing usable left
    elif i == 3:
        write_truncated(image, i)
        exp.truncated.add(name)
        return ocr, corrected, None
    elif i in (4, 5):
        exp.skipped[name] = "empty image file" if i == 4 else "missing image file"
        if i == 4:
            write_bad_image(image, "empty")
        return ocr, corrected, None
    elif i == 6:  # listed as image_7.PNG, saved with another extension
        return ocr, corrected, image.with_name(f"image_{i + 1}.jpeg")
    elif i == 7:  # listed as image_8.jpg, saved as image_8.JPG
        return ocr, corrected, image.with_name(f"image_{i + 1}.JPG")
    elif i == 8:
        corrected = exp.texts[name] = 'line one, "quoted"\nline two 😀'
    elif i == 10:
        exp.unreadable[name] = write_bad_image(image, "garbage")
        return ocr, corrected, None
    return ocr, corrected, image


def _write_memotion_test(root: Path, n_per_class: int, rng: np.random.Generator, exp: Expected) -> None:
    texts, labels = [], []
    for k, label in enumerate(rng.permutation([c for c in range(3) for _ in range(n_per_class)])):
        name = f"chuck_chuck_norris_meme_{k}.{'webp' if k == 0 else 'jpg'}"
        corrected = "" if k == 1 else f"test meme {k}"
        write_image(root / "2000_data" / name, 100 + k)
        texts.append([name, f"http://example.com/{k}", f"TEST OCR {k}", corrected])
        labels.append([name, f"{int(label) - 1}_{'1100_1100' if k % 2 else '0000_0000'}"])
        exp.labels[name], exp.texts[name] = int(label), corrected or f"TEST OCR {k}"
        exp.fixed_splits[name] = "test"
    rng.shuffle(labels)
    _write_csv_rows(root / "2000_testdata.csv", ["Image_name", "Image_URL", "OCR_extracted_text", "corrected_text"],
                    texts)
    _write_csv_rows(root / "Meme_groundTruth .csv", ["Image_name", "Labels"], labels)
    exp.label_files += [root / "2000_testdata.csv", root / "Meme_groundTruth .csv"]


def _write_csv_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------- MVSA

# (text, image) label pairs that combine to each class (the MVSA rule, written out by hand).
CLASS_PAIRS = {
    0: (("negative", "negative"), ("negative", "neutral"), ("neutral", "negative")),
    1: (("neutral", "neutral"),),
    2: (("positive", "positive"), ("positive", "neutral"), ("neutral", "positive")),
}


def write_mvsa(root: Path, *, kind: str = "single", n_per_class: int = 4, seed: int = 0, dirty: bool = True,
               n_conflict: int = 2, n_no_majority: int = 3) -> Expected:
    """root/MVSA_Single (or root/MVSA for multi) with labelResultAll.txt and data/; IDs ascending with gaps."""
    assert kind in ("single", "multi")
    assert not dirty or n_per_class >= 4, "the dirty cases need 10 kept rows"
    folder = root / ("MVSA_Single" if kind == "single" else "MVSA")
    rng = np.random.default_rng(seed)
    intents = [c for c in range(3) for _ in range(n_per_class)] + ["pos_neg_conflict"] * n_conflict
    intents += ["no_majority"] * (n_no_majority if kind == "multi" else 0)
    intents = [intents[i] for i in rng.permutation(len(intents))]
    exp = Expected(root=folder, labels={}, label_files=[folder / "labelResultAll.txt"])
    exp.cleaning = {"pos_neg_conflict": n_conflict} | ({"no_majority": n_no_majority} if kind == "multi" else {})
    lines, next_id, n_kept = [], int(rng.integers(1, 5)), 0
    for k, intent in enumerate(intents):
        id_ = str(next_id)
        next_id += int(rng.integers(1, 4))  # IDs are not contiguous
        text_pair = _intent_pair(intent, k)
        votes = _annotations(text_pair, intent, kind, rng)
        lines.append(id_ + "\t" + "\t".join(f"{t},{i}" for t, i in votes))
        if isinstance(intent, int):
            _write_mvsa_files(folder / "data", id_, intent, n_kept if dirty else -1, exp)
            n_kept += 1
        else:
            write_image(folder / "data" / f"{id_}.jpg", k)
            (folder / "data" / f"{id_}.txt").write_text(f"dropped row {id_}", encoding="utf-8")
    header = "ID\t" + "\t".join(["text,image"] * (1 if kind == "single" else 3))
    (folder / "labelResultAll.txt").write_text("\n".join([header] + lines) + "\n", encoding="utf-8")
    return exp


def _intent_pair(intent, k: int) -> tuple[str, str]:
    """The (text, image) majority labels that produce the intended outcome."""
    if intent == "pos_neg_conflict":
        return ("positive", "negative") if k % 2 else ("negative", "positive")
    if intent == "no_majority":
        return ("neutral", "positive")  # one modality is then replaced by a three-way tie
    return CLASS_PAIRS[intent][k % len(CLASS_PAIRS[intent])]


def _annotations(pair: tuple[str, str], intent, kind: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    if kind == "single":
        return [pair]
    columns = [_votes_with_majority(label, rng) for label in pair]
    if intent == "no_majority":
        columns[int(rng.integers(0, 2))] = list(rng.permutation(LABELS))  # 1 vote each: no majority
    return list(zip(columns[0], columns[1]))


def _votes_with_majority(label: str, rng: np.random.Generator) -> list[str]:
    """Three annotators, at least two of whom give `label` (sometimes all three)."""
    other = [x for x in LABELS if x != label][int(rng.integers(0, 2))]
    votes = [label, label, other if rng.random() < 0.7 else label]
    return [str(v) for v in rng.permutation(votes)]


def _write_mvsa_files(data: Path, id_: str, label: int, case: int, exp: Expected) -> None:
    """data/{id}.jpg and .txt; `case` picks the dirty case (the first ten kept rows get one each; -1: clean)."""
    image, text_file = data / f"{id_}.jpg", data / f"{id_}.txt"
    text = f"post {id_} feels {LABELS[label]} #mvsa"
    raw = text.encode("utf-8")
    exp.labels[id_] = label
    if case in (0, 1, 2):
        text, encoding, reported = (LATIN1_TEXT, CP1252_TEXT, GBK_TEXT)[case]
        raw = text.encode(encoding)
        exp.text_fallbacks[reported] = exp.text_fallbacks.get(reported, 0) + 1
    elif case == 3:
        text, raw = "", b""
    elif case == 4:
        raw = b"\xef\xbb\xbf  " + text.encode("utf-8") + b" \r\n"  # BOM and whitespace around the text
    write_image(image, int(id_))
    if case == 5:
        write_truncated(image, int(id_))
        exp.truncated.add(id_)
    elif case == 6:
        write_bad_image(image, "empty")
        exp.skipped[id_] = "empty image file"
    elif case == 7:
        image.unlink()
        exp.skipped[id_] = "missing image file"
    elif case == 8:
        exp.unreadable[id_] = write_bad_image(image, "garbage")
    if case == 9:
        exp.skipped[id_] = "missing text file"
        return
    text_file.write_bytes(raw)
    if id_ not in exp.skipped:
        exp.texts[id_] = text


# ---------------------------------------------------------------- generic CSV


def write_generic_csv(root: Path, *, n_per_class: int = 4, seed: int = 0, dirty: bool = True,
                      with_split: bool = False, numeric_labels: bool = False, with_id: bool = False) -> Expected:
    """root/data.csv with image, text, label (+ split, id) columns; images under root/imgs (relative paths)."""
    assert not dirty or n_per_class >= 2, "the dirty cases need 6 rows"
    rng = np.random.default_rng(seed)
    path = root / "data.csv"
    exp = Expected(root=path, labels={}, label_files=[path])
    header = ["image", "text", "label"] + (["split"] if with_split else []) + (["id"] if with_id else [])
    rows = []
    for i, label in enumerate(rng.permutation([c for c in range(3) for _ in range(n_per_class)])):
        label = int(label)
        written = f"imgs/{'sub/' if i % 3 == 0 else ''}pic_{i}.{'png' if i % 2 else 'jpg'}"
        image, text = root / written, f"row {i} is {LABELS[label]}"
        if dirty and i == 0:
            image = write_image(root / "elsewhere" / f"abs_{i}.jpg", i)
            written = str(image.resolve())  # an absolute path
        id_ = f"row-{i}" if with_id else written
        exp.labels[id_], exp.texts[id_] = label, text
        if dirty and i == 1:
            exp.skipped[id_] = "missing image file"
        elif dirty and i == 2:
            exp.skipped[id_] = "empty image file"
            write_bad_image(image, "empty")
        elif not (dirty and i == 0):
            write_image(image, i)
        if dirty and i == 3:
            text = exp.texts[id_] = ""
        label_cell = str(label - 1) if numeric_labels else LABELS[label].capitalize() if i % 2 else LABELS[label]
        row = [written, f"  {text}  ", label_cell]
        if with_split:
            exp.fixed_splits[id_] = ("train", "val", "test", "train")[i % 4]
            row.append(exp.fixed_splits[id_].upper() if i == 1 else exp.fixed_splits[id_])
        rows.append(row + ([id_] if with_id else []))
    for id_ in exp.skipped:
        exp.texts.pop(id_, None)
    _write_csv_rows(path, header, rows)
    return exp


# ---------------------------------------------------------------- planted duplicates across splits


@dataclass
class PlantedDuplicates:
    expected: Expected  # the MVSA-Single dataset, texts as planted
    split_file: Path  # id,split for every post
    splits: dict[str, list[str]]  # split -> ids
    counts: dict[str, dict[str, int]]  # "train-test" -> {"text": n, "image": n, "either": n}, worked out by hand
    of_training: dict[str, str]  # val/test id -> what it shares with a training post ("text", "image", ...)


def write_planted_duplicates(root: Path) -> PlantedDuplicates:
    """MVSA-Single with 12 posts fixed by a split file (6 train, 3 val, 3 test) and duplicates planted across splits,
    with near misses that must not count:
    - test[0] retweets train[0]: "RT @newsdesk: " + its text in capitals + a link (text);
    - test[1] is train[1]'s picture saved again as a PNG under its .jpg name: other bytes, same pixels (image);
    - val[0] has train[2]'s text with other spacing and case, and its picture copied byte for byte (text and image);
    - test[2] mentions someone in val[1]'s text (val-test text);
    - near misses: val[2] holds train[3]'s picture re-encoded as a low-quality JPEG (other pixels), and a bare link
      as its text, as does train[5] (texts empty once normalised match nothing)."""
    exp = write_mvsa(root, kind="single", n_per_class=4, seed=3, dirty=False, n_conflict=0)
    ids = sorted(exp.labels, key=int)
    splits = {"train": ids[:6], "val": ids[6:9], "test": ids[9:12]}
    train, val, test = splits["train"], splits["val"], splits["test"]
    data = exp.root / "data"

    def set_text(id_: str, text: str) -> None:
        (data / f"{id_}.txt").write_text(text, encoding="utf-8")
        exp.texts[id_] = text.strip()

    set_text(test[0], f"RT @newsdesk: {exp.texts[train[0]].upper()}  https://t.co/AbC123")
    Image.open(data / f"{train[1]}.jpg").convert("RGB").save(data / f"{test[1]}.jpg", "PNG")
    set_text(val[0], "  " + exp.texts[train[2]].title().replace(" ", "   ") + "\n")
    (data / f"{val[0]}.jpg").write_bytes((data / f"{train[2]}.jpg").read_bytes())
    set_text(test[2], f"@someone {exp.texts[val[1]]}")
    Image.open(data / f"{train[3]}.jpg").convert("RGB").save(data / f"{val[2]}.jpg", "JPEG", quality=20)
    set_text(val[2], "https://t.co/first")
    set_text(train[5], "http://t.co/second")
    split_file = root / "split.csv"
    split_file.write_text("id,split\n" + "".join(f"{i},{s}\n" for s, members in splits.items() for i in members))
    counts = {"train-val": {"text": 1, "image": 1, "either": 1}, "train-test": {"text": 1, "image": 1, "either": 2},
              "val-test": {"text": 1, "image": 0, "either": 1}}
    return PlantedDuplicates(exp, split_file, splits, counts,
                             {val[0]: "text and image", test[0]: "text", test[1]: "image"})
