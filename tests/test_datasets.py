"""The dataset readers against tiny copies of each real format (tests/dataset_writers.py)."""

from collections import Counter

import pytest

from dataset_writers import write_generic_csv, write_image, write_memotion, write_mvsa
from fusion.errors import DatasetError, LabelFileError
from fusion.extract.datasets.registry import DATASETS, load_dataset
from fusion.extract.datasets.splits import held_out_size, split_8_1_1, split_pool, split_sizes
from fusion.labels import SPLITS

# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("n, sizes", [(4511, (3611, 450, 450)), (17024, (13624, 1700, 1700))])
def test_split_sizes_reproduce_the_published_mvsa_splits(n, sizes):
    assert split_sizes(n) == sizes


@pytest.mark.parametrize("n", [0, 1, 4, 5, 9, 10, 27, 999, 1000, 1049, 6992])
def test_split_sizes_add_up_and_hold_out_about_ten_percent(n):
    train, val, test = split_sizes(n)
    assert train + val + test == n and val == test == held_out_size(n)
    assert abs(test - n / 10) <= (5 if n >= 1000 else 0.5)


def _labels(counts=(60, 25, 215)):
    return [c for c, k in enumerate(counts) for _ in range(k)][::-1]  # unsorted-ish, imbalanced


def test_split_8_1_1_sizes_stratified_and_seeded():
    labels = _labels()
    splits = split_8_1_1(labels, seed=3)
    assert Counter(splits) == dict(zip(("train", "val", "test"), split_sizes(len(labels))))
    for part in ("val", "test"):
        got = Counter(label for label, s in zip(labels, splits) if s == part)
        for label, total in Counter(labels).items():
            assert abs(got[label] - total * 30 / len(labels)) <= 1  # 30 of 300 held out per part
    assert split_8_1_1(labels, seed=3) == splits
    assert split_8_1_1(labels, seed=4) != splits


def test_split_pool_with_and_without_an_official_test():
    labels = _labels()
    with_test = Counter(split_pool(labels, 0, has_test=True))
    assert with_test == {"train": 270, "val": 30}
    without = Counter(split_pool(labels, 0, has_test=False))
    assert without == {"train": 243, "test": 30, "val": 27}


@pytest.mark.parametrize("labels", [[0, 1, 2, 2, 2], [2] * 7, [0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]])
def test_tiny_label_lists_split_without_error(labels):
    splits = split_8_1_1(labels, seed=0)
    assert len(splits) == len(labels) and Counter(splits)["test"] == held_out_size(len(labels))


# ---------------------------------------------------------------- MVSA


def _by_split(data):
    """id -> split over samples and skipped rows together."""
    return {s.id: s.split for s in data.samples} | {id_: split for id_, split, _ in data.skipped}


def _check_against_expected(data, exp):
    assert {s.id for s in data.samples} == exp.sample_ids
    assert {(id_, reason) for id_, _, reason in data.skipped} == set(exp.skipped.items())
    assert data.cleaning == exp.cleaning
    assert data.text_fallbacks == exp.text_fallbacks
    assert data.source_files == exp.label_files
    for sample in data.samples:
        assert (sample.label, sample.text) == (exp.labels[sample.id], exp.texts[sample.id])
        assert sample.image.is_absolute() and sample.image.is_file()
    order = [SPLITS.index(s.split) for s in data.samples]
    assert order == sorted(order)  # train, then val, then test


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_mvsa_dirty_dataset_matches_what_was_written(tmp_path, kind):
    exp = write_mvsa(tmp_path, kind=kind, n_per_class=10, n_conflict=4, n_no_majority=5, seed=1)
    data = load_dataset(f"mvsa-{kind}", exp.root, seed=0)
    _check_against_expected(data, exp)
    assert exp.cleaning["pos_neg_conflict"] == 4 and exp.cleaning.get("no_majority", 5) == 5
    assert Counter(_by_split(data).values()) == dict(zip(SPLITS, split_sizes(len(exp.labels))))
    assert data.name == f"mvsa-{kind}"


def test_mvsa_splits_do_not_depend_on_image_failures(tmp_path):
    exp = write_mvsa(tmp_path, kind="single", n_per_class=10, dirty=False, seed=2)
    before = _by_split(load_dataset("mvsa-single", exp.root, seed=5))
    for id_ in sorted(exp.labels)[:6]:
        (exp.root / "data" / f"{id_}.jpg").unlink()
    after = load_dataset("mvsa-single", exp.root, seed=5)
    assert _by_split(after) == before
    assert len(after.skipped) == 6


def test_mvsa_root_may_be_the_parent_of_exactly_one_dataset_folder(tmp_path):
    exp = write_mvsa(tmp_path, kind="multi", n_per_class=4, seed=0)
    direct = load_dataset("mvsa-multi", exp.root)
    assert load_dataset("mvsa-multi", tmp_path).samples == direct.samples
    write_mvsa(tmp_path, kind="single", n_per_class=4, seed=0)
    with pytest.raises(DatasetError, match="several MVSA folders"):
        load_dataset("mvsa-multi", tmp_path)


@pytest.mark.parametrize("make", ["missing", "empty_folder"])
def test_mvsa_missing_root_is_a_dataset_error(tmp_path, make):
    root = tmp_path / "nowhere"
    if make == "empty_folder":
        root.mkdir()
    with pytest.raises(DatasetError, match=str(root)):
        load_dataset("mvsa-single", root)


# ---------------------------------------------------------------- memotion


def test_memotion_pool_only_holds_out_test_then_val(tmp_path):
    exp = write_memotion(tmp_path, n_per_class=10, seed=1)
    data = load_dataset("memotion", tmp_path, seed=0)
    _check_against_expected(data, exp)
    n_test = held_out_size(30)
    assert Counter(_by_split(data).values()) == {"test": n_test, "val": held_out_size(30 - n_test),
                                                 "train": 30 - n_test - held_out_size(30 - n_test)}


def test_memotion_official_test_set_and_root_at_the_dataset_folder(tmp_path):
    exp = write_memotion(tmp_path, n_per_class=6, seed=2, official_test=True, n_test_per_class=3)
    data = load_dataset("memotion", tmp_path, seed=0)
    _check_against_expected(data, exp)
    assert {s.id for s in data.split("test")} == set(exp.fixed_splits)
    assert Counter(_by_split(data).values())["val"] == held_out_size(18)
    again = load_dataset("memotion", tmp_path / "memotion_dataset_7k", seed=0)
    assert again.samples == data.samples


def test_memotion_incomplete_official_test_is_a_dataset_error(tmp_path):
    write_memotion(tmp_path, n_per_class=4, official_test=True)
    (tmp_path / "Meme_groundTruth .csv").unlink()
    with pytest.raises(DatasetError, match="Meme_groundTruth"):
        load_dataset("memotion", tmp_path)


def test_memotion_missing_root_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="labels.csv"):
        load_dataset("memotion", tmp_path)


# ---------------------------------------------------------------- generic CSV


@pytest.mark.parametrize("numeric, with_id", [(False, False), (True, True)])
def test_csv_without_split_column_is_split_8_1_1(tmp_path, numeric, with_id):
    exp = write_generic_csv(tmp_path, n_per_class=10, numeric_labels=numeric, with_id=with_id, seed=3)
    data = load_dataset("csv", exp.root, seed=1)
    _check_against_expected(data, exp)
    assert Counter(_by_split(data).values()) == dict(zip(SPLITS, split_sizes(30)))


def test_csv_split_column_is_followed(tmp_path):
    exp = write_generic_csv(tmp_path, n_per_class=4, with_split=True)
    data = load_dataset("csv", exp.root)
    _check_against_expected(data, exp)
    assert _by_split(data) == exp.fixed_splits


def test_csv_text_in_another_encoding_is_decoded_and_counted(tmp_path):
    write_image(tmp_path / "a.jpg", 1)
    write_image(tmp_path / "b.png", 2)
    (tmp_path / "d.csv").write_bytes(b"image,text,label,split\na.jpg,caf\xe9 cr\xe8me,positive,train\n"
                                     + "b.png,今天很好,negative,test\n".encode("gbk"))
    data = load_dataset("csv", tmp_path / "d.csv")
    assert [s.text for s in data.samples] == ["café crème", "今天很好"]
    assert data.text_fallbacks == {"cp1252": 1, "gb18030": 1}


def test_csv_root_must_be_the_file(tmp_path):
    with pytest.raises(DatasetError, match="expected a CSV file"):
        load_dataset("csv", tmp_path)


def test_unknown_dataset_name():
    assert set(DATASETS) == {"memotion", "mvsa-single", "mvsa-multi", "csv", "demo", "hf"}
    with pytest.raises(DatasetError, match="unknown dataset 'imdb'"):
        load_dataset("imdb", ".")


# ---------------------------------------------------------------- bad label files


def _replace_line(path, number, make):
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[number - 1] = make(lines[number - 1])
    path.write_text("\n".join(lines), encoding="utf-8")


BAD_MVSA = [
    ("empty file", lambda p: p.write_bytes(b""), 1, "empty file"),
    ("binary", lambda p: p.write_bytes(b"ID\ttext,image\n12\t\x00\x9f\xff\x00garbage"), 2, "binary"),
    ("no header", lambda p: _replace_line(p, 1, lambda line: "4\tpositive,positive"), 1, "header"),
    ("spaces not tabs", lambda p: _replace_line(p, 3, lambda line: line.replace("\t", "    ")), 3, "tab-separated"),
    ("unknown label", lambda p: _replace_line(p, 4, lambda line: line.split("\t")[0] + "\tpositve,neutral"), 4,
     "unknown label 'positve'"),
    ("not a pair", lambda p: _replace_line(p, 2, lambda line: line.split("\t")[0] + "\tpositive"), 2, "label pair"),
    ("multi file", lambda p: _replace_line(p, 5, lambda line: line + "\tneutral,neutral\tneutral,neutral"), 5,
     "MVSA-Multi"),
    ("duplicate", lambda p: _replace_line(p, 6, lambda line: _first_row_id(p) + line[line.index("\t"):]), 6,
     "duplicate ID"),
    ("header only", lambda p: p.write_text("ID\ttext,image\n"), 1, "no labelled rows"),
]


def _first_row_id(path):
    return path.read_text().split("\n")[1].split("\t")[0]


@pytest.mark.parametrize("case, corrupt, line, what", BAD_MVSA, ids=[c[0] for c in BAD_MVSA])
def test_bad_mvsa_label_file(tmp_path, case, corrupt, line, what):
    exp = write_mvsa(tmp_path, kind="single", n_per_class=4, dirty=False)
    corrupt(exp.label_files[0])
    _expect_label_error(lambda: load_dataset("mvsa-single", exp.root), exp.label_files[0], line, what)


BAD_MEMOTION = [
    ("missing column", 0, lambda p: _replace_line(p, 1, lambda line: line.replace("overall_sentiment", "mood")), 1,
     "missing column(s) overall_sentiment"),
    ("semicolons", 0, lambda p: _replace_line(p, 1, lambda line: line.replace(",", ";")), 1, "missing column"),
    ("unknown grade", 0, lambda p: _replace_line(p, 5, lambda line: line.rsplit(",", 1)[0] + ",great"), 5,
     "unknown overall_sentiment 'great'"),
    ("ragged row", 0, lambda p: _replace_line(p, 4, lambda line: line + ",extra"), 4, "expected 9 fields"),
    ("empty", 0, lambda p: p.write_bytes(b"\n\n"), 1, "empty file"),
    ("bad test label", 2, lambda p: _replace_line(p, 3, lambda line: line.split(",")[0] + ",2_0000_0000"), 3,
     "must start with -1_, 0_ or 1_"),
    ("test texts header", 1, lambda p: _replace_line(p, 1, lambda line: "Image_name,Image_URL"), 1,
     "missing column(s) ocr_extracted_text, corrected_text"),
]


@pytest.mark.parametrize("case, which, corrupt, line, what", BAD_MEMOTION, ids=[c[0] for c in BAD_MEMOTION])
def test_bad_memotion_label_files(tmp_path, case, which, corrupt, line, what):
    exp = write_memotion(tmp_path, n_per_class=4, dirty=False, official_test=True)
    path = exp.label_files[which]
    corrupt(path)
    _expect_label_error(lambda: load_dataset("memotion", tmp_path), path, line, what)


def _set_csv_cell(path, line, column, value):
    """Replace one cell of a plain (unquoted) CSV line, the column found by header name."""
    index = path.read_text().split("\n")[0].split(",").index(column)
    _replace_line(path, line, lambda text: ",".join(value if i == index else cell
                                                    for i, cell in enumerate(text.split(","))))


def _csv_cell(path, line, column):
    index = path.read_text().split("\n")[0].split(",").index(column)
    return path.read_text().split("\n")[line - 1].split(",")[index]


BAD_CSV = [
    ("unknown label", lambda p: _set_csv_cell(p, 3, "label", "happy"), 3, "unknown label 'happy'"),
    ("unknown split", lambda p: _set_csv_cell(p, 2, "split", "holdout"), 2, "unknown split 'holdout'"),
    ("no label column", lambda p: _set_csv_cell(p, 1, "label", "sentiment"), 1, "missing column(s) label"),
    ("duplicate image", lambda p: _set_csv_cell(p, 4, "image", _csv_cell(p, 2, "image")), 4, "duplicate id"),
    ("empty image", lambda p: _set_csv_cell(p, 5, "image", " "), 5, "empty image path"),
]


@pytest.mark.parametrize("case, corrupt, line, what", BAD_CSV, ids=[c[0] for c in BAD_CSV])
def test_bad_generic_csv(tmp_path, case, corrupt, line, what):
    exp = write_generic_csv(tmp_path, n_per_class=4, dirty=False, with_split=True)
    corrupt(exp.root)
    _expect_label_error(lambda: load_dataset("csv", exp.root), exp.root, line, what)


def _expect_label_error(load, path, line, what):
    with pytest.raises(LabelFileError) as caught:
        load()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line {line}: "), message
    assert what in message, message
