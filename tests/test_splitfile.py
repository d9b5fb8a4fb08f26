"""`--split-file`: parsing (one-line errors with file and line), applying it by id (counts), the split source recorded
in the cache, and the default sources (stratified, official Memotion test, Memotion holdout)."""

from __future__ import annotations

import hashlib
import json

import pytest
from dataset_writers import write_generic_csv, write_memotion, write_mvsa
from tiny_models import extract_argv

from fusion.cache.reader import read_cache
from fusion.cli import main
from fusion.extract.datasets.registry import load_dataset
from fusion.extract.datasets.splitfile import SplitFileError, read_split_file, with_splits


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_parses_csv_and_tsv_with_or_without_header(tmp_path):
    csv_file = _write(tmp_path / "s.csv", "id,split\n12,train\n 7 , VAL\n\n\"a,b\",test\n")
    parsed = read_split_file(csv_file)
    assert parsed.splits == {"12": "train", "7": "val", "a,b": "test"}
    assert parsed.sha256 == hashlib.sha256(csv_file.read_bytes()).hexdigest()
    tsv = _write(tmp_path / "s.tsv", "12\ttrain\n7\tval\n")
    assert read_split_file(tsv).splits == {"12": "train", "7": "val"}
    sniffed = _write(tmp_path / "s.txt", "image_1.jpg\ttest\n")
    assert read_split_file(sniffed).splits == {"image_1.jpg": "test"}


@pytest.mark.parametrize("text, line, message", [
    ("id,split\n1,train\n2,val\n1,test\n", 4, "id '1' appears twice (first on line 2)"),
    ("1,train\n2,dev\n", 2, "split 'dev' is not train, val or test"),
    ("1,train\n2,val,extra\n", 2, "expected 2 columns (id,split), found 3"),
    ("1,train\n,val\n", 2, "empty id"),
])
def test_bad_files_are_refused_with_file_and_line(tmp_path, capsys, text, line, message):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(SplitFileError) as error:
        read_split_file(path)
    assert str(error.value) == f"{path}:{line}: {message}"
    assert main(["extract", "--dataset", "mvsa-single", "--root", str(tmp_path), "--split-file", str(path)]) == 1
    assert capsys.readouterr().err.strip() == f"fusion: error: {path}:{line}: {message}"


def test_empty_or_undecodable_files_are_refused(tmp_path):
    with pytest.raises(SplitFileError, match="no id,split rows"):
        read_split_file(_write(tmp_path / "e.csv", "id,split\n\n"))
    (tmp_path / "b.csv").write_bytes(b"1,train\n\xff\xfe,val\n")
    with pytest.raises(SplitFileError, match="not UTF-8"):
        read_split_file(tmp_path / "b.csv")
    with pytest.raises(SplitFileError, match="cannot read"):
        read_split_file(tmp_path / "missing.csv")


def _published_split(ids: list[str]) -> dict[str, str]:
    """A split unlike the reader's own: by position, every third id in test, the next in val."""
    return {id_: ("train", "val", "test")[k % 3] for k, id_ in enumerate(sorted(ids, key=int))}


def test_applying_a_file_fixes_every_split_and_counts_the_mismatches(tmp_path):
    expected = write_mvsa(tmp_path, kind="single", n_per_class=5, seed=2)
    ids = sorted(expected.labels, key=int)
    wanted = _published_split(ids[2:])  # the first two data ids are not in the file
    lines = [f"{id_},{split}" for id_, split in wanted.items()] + ["9991,train", "9992,test", "9993,val"]
    path = _write(tmp_path / "split.csv", "id,split\n" + "\n".join(lines) + "\n")
    data = with_splits(load_dataset("mvsa-single", expected.root), read_split_file(path), seed=0)
    assert {s.id: s.split for s in data.samples} | {i: s for i, s, _ in data.skipped} == wanted
    order = ("train", "val", "test").index
    assert [s.split for s in data.samples] == sorted((s.split for s in data.samples), key=order)
    assert data.split_counts == {"ids_in_file_not_in_data": 3, "rows_in_data_not_in_file": 2}
    assert data.split_source["split_kind"] == "file" and data.split_source["split_file"] == "split.csv"
    assert data.split_source["split_file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path in data.source_files


def test_default_split_sources(tmp_path):
    mvsa = with_splits(load_dataset("mvsa-single", write_mvsa(tmp_path / "m").root, seed=4), None, seed=4)
    assert mvsa.split_source == {"split_kind": "stratified", "split_source": "seeded stratified 8:1:1 (seed 4)"}
    holdout = with_splits(load_dataset("memotion", write_memotion(tmp_path / "h").root), None, seed=0)
    assert holdout.split_source["split_kind"] == "memotion-holdout"
    assert "10% holdout" in holdout.split_source["split_source"]
    official = write_memotion(tmp_path / "o", official_test=True)
    assert with_splits(load_dataset("memotion", official.root), None, 0).split_source["split_kind"] == \
        "memotion-official-test"
    column = write_generic_csv(tmp_path / "c", with_split=True)
    assert with_splits(load_dataset("csv", column.root), None, 0).split_source["split_kind"] == "csv-column"
    plain = write_generic_csv(tmp_path / "p")
    assert with_splits(load_dataset("csv", plain.root), None, 0).split_source["split_kind"] == "stratified"


def test_extract_with_a_split_file_writes_exactly_those_splits(tmp_path, tiny_models, capsys):
    expected = write_mvsa(tmp_path / "data", kind="single", n_per_class=4, seed=1)
    ids = sorted(expected.labels, key=int)  # samples, and rows skipped for a missing or empty file
    wanted = _published_split(ids[1:])
    path = _write(tmp_path / "split.tsv", "".join(f"{i}\t{s}\n" for i, s in wanted.items()) + "404\ttest\n")
    out, plain = tmp_path / "cache.h5", tmp_path / "plain.h5"
    assert main(extract_argv(expected.root, out, tiny_models, "--split-file", str(path))) == 0
    printed = capsys.readouterr().out
    assert "1 ids not in the data, 1 data rows not in the file" in " ".join(printed.split())
    cache = read_cache(out)
    got = {str(i): name for name, split in cache.splits.items() for i in split.id}
    got |= {str(i): split for i, split, _ in cache.skipped}
    assert got == wanted
    assert cache.attrs["split_kind"] == "file"
    assert cache.attrs["split_file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert main(extract_argv(expected.root, plain, tiny_models)) == 0
    other = read_cache(plain)
    assert other.attrs["split_kind"] == "stratified" and other.attrs["fingerprint"] != cache.attrs["fingerprint"]


def test_cache_info_names_the_split_source(tmp_path, tiny_models, capsys):
    expected = write_mvsa(tmp_path / "data", kind="single", n_per_class=4, seed=1)
    out = tmp_path / "cache.h5"
    assert main(extract_argv(expected.root, out, tiny_models, "--seed", "3")) == 0
    capsys.readouterr()
    assert main(["cache", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["split_source"] == "seeded stratified 8:1:1 (seed 3)"
