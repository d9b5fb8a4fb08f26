"""`--dataset hf`: a dataset written with `datasets` itself (save_to_disk, to_parquet), read with its own splits or
the stratified 8:1:1 split; bad rows skipped with their reasons, image bytes decoded with the same checks as files."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest
from dataset_writers import NOT_AN_IMAGE, write_image, write_truncated
from tiny_models import extract_argv

from fusion.cache.reader import read_cache
from fusion.cli import main
from fusion.errors import DatasetError
from fusion.extract.datasets.registry import load_dataset
from fusion.extract.images import ImageUnreadable, load_rgb

pytestmark = pytest.mark.usefixtures("one_thread")
LABEL_NAMES = ["negative", "neutral", "positive"]
FEATURES = datasets.Features({"post_id": datasets.Value("string"), "img": datasets.Image(),
                              "caption": datasets.Value("string"),
                              "sentiment": datasets.ClassLabel(names=LABEL_NAMES)})
COLUMNS = "image=img,text=caption,label=sentiment,id=post_id"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Parquet files are converted into the datasets cache: keep it inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def png_bytes(folder, index: int) -> bytes:
    return write_image(folder / f"img{index}.png", index).read_bytes()


def split_table(folder, split: str, n: int, bad: dict[int, str]) -> tuple[dict, dict[str, str]]:
    """Columns of `n` rows of `split` (labels cycling through the classes) and {id: reason} of the bad ones:
    bad maps a row to one of: 'undecodable', 'no image', 'empty text', 'missing label'."""
    rows = {"post_id": [], "img": [], "caption": [], "sentiment": []}
    reasons = {}
    for i in range(n):
        sid = f"{split}-{i}"
        kind = bad.get(i)
        rows["post_id"].append(sid)
        rows["img"].append({"bytes": b"not an image at all" if kind == "undecodable" else png_bytes(folder, i),
                            "path": None} if kind != "no image" else None)
        rows["caption"].append("   " if kind == "empty text" else f"post {i} of {split} is {LABEL_NAMES[i % 3]}")
        rows["sentiment"].append(-1 if kind == "missing label" else i % 3)
        if kind:
            reasons[sid] = {"undecodable": NOT_AN_IMAGE, "no image": "missing image"}.get(kind, kind)
    return rows, reasons


@pytest.fixture(scope="module")
def saved_dict(tmp_path_factory):
    """A DatasetDict with train/validation/test, saved with save_to_disk; train holds one bad row of each kind."""
    folder = tmp_path_factory.mktemp("hf-saved")
    bad = {"train": {1: "undecodable", 2: "no image", 3: "empty text", 4: "missing label"}, "validation": {},
           "test": {0: "empty text"}}
    tables, reasons = {}, {}
    for split, n in (("train", 9), ("validation", 3), ("test", 4)):
        rows, split_reasons = split_table(folder, split, n, bad[split])
        tables[split] = datasets.Dataset.from_dict(rows, features=FEATURES)
        reasons.update(split_reasons)
    datasets.DatasetDict(tables).save_to_disk(str(folder / "saved"))
    return folder / "saved", reasons


def test_a_saved_dataset_dict_keeps_its_splits_and_lists_bad_rows(saved_dict):
    root, reasons = saved_dict
    data = load_dataset("hf", root, columns=COLUMNS)
    assert Counter(s.split for s in data.samples) == {"train": 9 - 2, "val": 3, "test": 4 - 1}
    assert all(s.id.startswith({"val": "validation"}.get(s.split, s.split)) for s in data.samples)
    assert {sid: reason for sid, _, reason in data.skipped} == {"train-3": "empty text", "train-4": "missing label",
                                                               "test-0": "empty text"}
    assert data.settings["columns"] == "id=post_id,image=img,label=sentiment,text=caption"
    assert {s.id: s.label for s in data.samples}["train-5"] == LABEL_NAMES.index("positive")


def test_extracting_a_saved_dataset_records_every_skip_with_its_reason(saved_dict, tiny_models, tmp_path):
    root, reasons = saved_dict
    out = tmp_path / "hf.h5"
    assert main(extract_argv(root, out, tiny_models, "--columns", COLUMNS, dataset="hf")) == 0
    cache = read_cache(out)
    assert {sid: reason for sid, _, reason in cache.skipped} == reasons
    assert {split: len(arrays.id) for split, arrays in cache.splits.items()} == {"train": 5, "val": 3, "test": 3}
    assert cache.attrs["dataset"] == "hf"
    assert cache.attrs["columns"] == "id=post_id,image=img,label=sentiment,text=caption"


def test_parquet_files_without_splits_get_the_stratified_8_1_1_split(tmp_path, tiny_models):
    """Labels -1/0/1 (and one unknown), images as paths relative to the folder, ids by row."""
    folder = tmp_path / "pq"
    rows = {"image": [], "text": [], "label": []}
    for i in range(31):
        rows["image"].append(write_image(folder / "images" / f"p{i}.jpg", i).relative_to(folder).as_posix())
        rows["text"].append(f"picture {i}")
        rows["label"].append("mixed" if i == 30 else str(i % 3 - 1))
    table = datasets.Dataset.from_dict(rows)
    table.select(range(15)).to_parquet(str(folder / "part-a.parquet"))
    table.select(range(15, 31)).to_parquet(str(folder / "part-b.parquet"))
    data = load_dataset("hf", folder, seed=3)
    assert Counter(s.split for s in data.samples) == {"train": 24, "val": 3, "test": 3}  # 30 labelled: 10% each
    assert data.skipped == [("30", "train", "unknown label 'mixed'")]
    for split in ("val", "test"):
        assert sorted(s.label for s in data.split(split)) == [0, 1, 2]  # stratified
    assert {s.id: s.label for s in data.samples}["5"] == 2  # "1" is positive
    out = tmp_path / "pq.h5"
    assert main(extract_argv(folder, out, tiny_models, dataset="hf")) == 0
    cache = read_cache(out)
    assert sum(len(arrays.id) for arrays in cache.splits.values()) == 30
    assert [reason for _, _, reason in cache.skipped] == ["unknown label 'mixed'"]


def test_hub_layout_parquet_with_train_and_test_gets_val_from_train(tmp_path):
    folder = tmp_path / "hub"
    for split, n in (("train", 20), ("test", 5)):
        rows, _ = split_table(tmp_path / "imgs", split, n, {})
        target = folder / "data" / f"{split}-00000-of-00001.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=FEATURES).to_parquet(str(target))
    data = load_dataset("hf", folder, columns=COLUMNS)
    assert Counter(s.split for s in data.samples) == {"train": 18, "val": 2, "test": 5}
    assert {s.id for s in data.split("test")} == {f"test-{i}" for i in range(5)}
    assert data.source_files == sorted((folder / "data").glob("*.parquet"))


def test_bad_arguments_and_folders_are_one_line(tmp_path, saved_dict):
    root, _ = saved_dict
    with pytest.raises(DatasetError, match="no column for image=picture.*its columns are post_id, img"):
        load_dataset("hf", root, columns="image=picture,text=caption,label=sentiment")
    with pytest.raises(DatasetError, match="ROLE=COLUMN"):
        load_dataset("hf", root, columns="img")
    with pytest.raises(DatasetError, match="--columns applies to --dataset hf"):
        load_dataset("csv", tmp_path / "x.csv", columns="image=img")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither a dataset written by save_to_disk"):
        load_dataset("hf", tmp_path / "empty")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the bomb is the point
def test_image_bytes_get_the_checks_of_image_files(tmp_path):
    """A truncated image loads the same from bytes as from its file; a bomb is refused before decoding."""
    truncated = write_truncated(tmp_path / "cut.png", 4)
    assert np.array_equal(np.asarray(load_rgb(truncated.read_bytes())), np.asarray(load_rgb(truncated)))
    from PIL import Image
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # 100 M pixels in a few kB
    for source in (bomb, bomb.read_bytes()):
        with pytest.raises(ImageUnreadable, match="decompression bomb"):
            load_rgb(source)
    with pytest.raises(ImageUnreadable, match="empty image data"):
        load_rgb(b"")
