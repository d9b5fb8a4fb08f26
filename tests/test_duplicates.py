"""Duplicates across splits (extract/duplicates.py): what a normalised text is, the pixel hash, the counts on a dataset
with planted duplicates, their record in the cache (`cache info`, results' cache meta, report.md), and `--dedupe`
(off by default, in the fingerprint, dropped posts listed as skipped)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dataset_writers import write_planted_duplicates
from PIL import Image
from tiny_models import extract_argv

from fusion.app.reporting.duplicates import duplicate_lines
from fusion.cache.reader import read_cache
from fusion.cli import main
from fusion.extract.datasets.registry import load_dataset
from fusion.extract.datasets.splitfile import read_split_file, with_splits
from fusion.extract.duplicates import find_duplicates, image_digest, image_digests, normalise_text
from fusion.heads.runs import load_features

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("a, b", [
    ("RT @user_1: Great game tonight!", "great game tonight!"),  # a retweet's prefix
    ("Great game https://t.co/AbC tonight! www.example.com/x", "great   game tonight!"),  # links
    ("thanks @bob and @carol", "thanks and"),  # mentions anywhere
    ("ＧＲＥＡＴ　ｇａｍｅ", "great game"),  # NFKC: full-width letters and space
    ("STRASSE", "straße"),  # casefold, not lower
    ("  tabs\tand\nnewlines  ", "tabs and newlines"),
])
def test_texts_that_normalise_alike(a, b):
    assert normalise_text(a) == normalise_text(b)


@pytest.mark.parametrize("a, b", [
    ("#happy day", "happy day"),  # a hashtag is part of what is said
    ("great game", "great games"),
    ("start the game", "art the game"),  # "rt" inside a word is not a retweet
])
def test_texts_that_stay_apart(a, b):
    assert normalise_text(a) != normalise_text(b)


def test_a_bare_link_or_mention_normalises_to_nothing():
    assert normalise_text("https://t.co/x") == normalise_text("RT @a:") == normalise_text("  ") == ""


def test_the_image_hash_is_of_pixels_not_file_bytes(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "b.bmp")  # other format, other bytes, same pixels
    Image.fromarray(pixels).save(tmp_path / "c.jpg", quality=95)  # lossy: other pixels
    Image.fromarray(pixels.reshape(4, 6, 3)).save(tmp_path / "d.png")  # same bytes, other shape
    (tmp_path / "e.jpg").write_bytes(b"not an image")
    a, b, c, d, e = (image_digest(tmp_path / name) for name in ("a.png", "b.bmp", "c.jpg", "d.png", "e.jpg"))
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.bmp").read_bytes()
    assert a == b and len({a, c, d}) == 3 and e is None
    assert image_digest((tmp_path / "a.png").read_bytes()) == a
    assert image_digests([tmp_path / "a.png", tmp_path / "e.jpg"], workers=0) == [a, None]


def test_planted_duplicates_are_counted_per_split_pair(tmp_path):
    planted = write_planted_duplicates(tmp_path)
    data = with_splits(load_dataset("mvsa-single", planted.expected.root), read_split_file(planted.split_file), 0)
    found = find_duplicates(data.samples, image_digests([s.image for s in data.samples], workers=0))
    assert found.counts == planted.counts
    assert {data.samples[i].id: what for i, what in found.of_training.items()} == planted.of_training
    train, val, test = (planted.splits[name] for name in ("train", "val", "test"))
    assert found.examples["train-test"] == [[test[0], train[0], "text"], [test[1], train[1], "image"]]
    assert found.examples["val-test"] == [[test[2], val[1], "text"]]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("planted")
    planted = write_planted_duplicates(root / "data")
    split = ("--split-file", str(planted.split_file))
    kept, deduped = root / "kept.h5", root / "deduped.h5"
    assert main(extract_argv(planted.expected.root, kept, tiny_models, *split)) == 0
    assert main(extract_argv(planted.expected.root, deduped, tiny_models, *split, "--dedupe")) == 0
    return planted, kept, deduped


def test_the_cache_records_the_counts_and_keeps_every_post_by_default(extracted, capsys):
    planted, kept, _ = extracted
    capsys.readouterr()
    assert main(["cache", "info", str(kept), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["duplicates"]
    assert record["pairs"] == planted.counts and record["dedupe"] is False
    assert record["dropped"] == {"val": 0, "test": 0}
    cache = read_cache(kept)
    assert {name: sorted(map(str, split.id)) for name, split in cache.splits.items()} == {
        name: sorted(ids) for name, ids in planted.splits.items()}
    assert "dedupe" not in cache.attrs  # off: the fingerprint is the one caches had before --dedupe existed
    assert main(["cache", "info", str(kept)]) == 0
    table = capsys.readouterr().out
    assert "posts that also occur in an earlier split" in table and "train-test" in table


def test_dedupe_drops_val_and_test_posts_seen_in_training_and_changes_the_fingerprint(extracted, capsys):
    planted, kept, deduped = extracted
    cache = read_cache(deduped)
    dropped = set(planted.of_training)
    for name, ids in planted.splits.items():
        assert sorted(map(str, cache.splits[name].id)) == sorted(set(ids) - dropped)
    assert {(str(i), reason) for i, _, reason in cache.skipped} == {
        (i, f"duplicates a training post ({what})") for i, what in planted.of_training.items()}
    record = json.loads(cache.attrs["duplicates"])
    assert record["pairs"] == planted.counts and record["dedupe"] is True
    assert record["dropped"] == {"val": 1, "test": 2}
    assert cache.attrs["dedupe"] is True
    assert cache.attrs["fingerprint"] != read_cache(kept).attrs["fingerprint"]
    capsys.readouterr()
    assert main(["cache", "info", str(deduped)]) == 0
    assert "--dedupe dropped val 1, test 2" in " ".join(capsys.readouterr().out.split())


def test_a_complete_cache_is_reused_and_still_reports_its_duplicates(extracted, tiny_models, capsys):
    planted, kept, _ = extracted
    capsys.readouterr()
    assert main(extract_argv(planted.expected.root, kept, tiny_models, "--split-file", str(planted.split_file))) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "already complete" in printed
    assert "duplicates across splits: train-val 1 (text 1, image 1); train-test 2 (text 1, image 1); val-test 1 " \
           "(text 1, image 0); kept" in printed


def test_reports_show_the_counts_from_the_results_cache_meta(extracted):
    planted, kept, deduped = extracted
    _, meta = load_features(kept)
    assert meta["duplicates"]["pairs"] == planted.counts
    line = " ".join(duplicate_lines(meta))
    assert "train–val 1 (text 1, image 1), train–test 2 (text 1, image 1), val–test 1 (text 1, image 0)" in line
    assert "They were kept" in line
    assert "dropped the 1 validation and 2 test posts" in " ".join(duplicate_lines(load_features(deduped)[1]))
    assert duplicate_lines({}) == ["- Duplicates across splits: not counted (a cache written before fusion counted "
                                   "them)."]


def test_reproduce_dedupe_extracts_without_the_duplicates_and_says_so(tmp_path, tiny_models):
    planted = write_planted_duplicates(tmp_path / "data")
    bert, dinov2 = tiny_models
    out = tmp_path / "out"
    argv = ["reproduce", "--data", str(tmp_path / "data"), "--out", str(out), "--text-model", str(bert),
            "--image-model", str(dinov2), "--heads", "basic", "--seeds", "1", "--lrs", "1e-2", "--dropouts", "0",
            "--losses", "ce", "--epochs", "1", "--resamples", "100", "--device", "cpu", "--workers", "0",
            "--split-file", f"mvsa-single={planted.split_file}", "--dedupe"]
    assert main(argv) == 0
    [cache_path] = (out / "caches").glob("mvsa-single-dedupe-split-*.h5")  # its own cache beside a kept one
    cache = read_cache(cache_path)
    assert cache.attrs["dedupe"] is True
    for name, ids in planted.splits.items():
        assert sorted(map(str, cache.splits[name].id)) == sorted(set(ids) - set(planted.of_training))
    text = " ".join((out / "reproduction.md").read_text().split())
    assert "were dropped (--dedupe), which the paper's protocol does not do" in text
    assert "`--dedupe` dropped the 1 validation and 2 test posts that duplicated a training post." in text
