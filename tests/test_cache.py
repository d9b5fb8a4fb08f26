"""The cache: partial folder -> finalize -> read, resume after a kill, locks, ranks, and every damaged-file message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from cache_fixtures import (batch_arrays, synthetic_plan, synthetic_rows, write_batches, write_synthetic_cache)

import fusion
from fusion.cache.fingerprint import fingerprint
from fusion.cache.info import cache_info
from fusion.cache.partial import PartialCache, Plan, batch_name, partial_dir
from fusion.cache.reader import TokenRows, is_complete_cache, read_cache, read_skipped
from fusion.cache.writer import finalize
from fusion.errors import CacheError, CacheLockedError
from fusion.labels import LABELS, SPLITS

DT, DI = 16, 24


def expected_split(plan: Plan, rows: dict, split: str) -> np.ndarray:
    """Global rows of `split` in plan order, skipped rows removed: the order the cache must keep."""
    return np.array([row for row, name in enumerate(plan.splits) if name == split and row not in rows["skipped"]],
                    dtype=np.int64)


def build(tmp_path, *, tokens=False, n_per_split=(12, 4, 4), n_skipped=3, seed=0):
    plan = synthetic_plan(n_per_split, dt=DT, di=DI, tokens=tokens, seed=seed)
    rows = synthetic_rows(plan, dt=DT, di=DI, tokens=tokens, seed=seed, n_skipped=n_skipped)
    return tmp_path / "cache.h5", plan, rows


def assert_matches(data, plan: Plan, rows: dict, *, tokens: bool = False) -> None:
    for split in SPLITS:
        wanted, got = expected_split(plan, rows, split), data.splits[split]
        np.testing.assert_array_equal(got.text, rows["text"][wanted])
        np.testing.assert_array_equal(got.image, rows["image"][wanted])
        np.testing.assert_array_equal(got.label, np.asarray(plan.labels)[wanted])
        assert got.id.tolist() == [plan.ids[row] for row in wanted]
        if tokens:
            np.testing.assert_array_equal(got.text_mask, rows["text_mask"][wanted])
            np.testing.assert_array_equal(got.text_tokens, rows["text_tokens"][wanted])
            np.testing.assert_array_equal(got.image_tokens, rows["image_tokens"][wanted])
    expected = [(plan.ids[row], plan.splits[row], reason) for row, reason in sorted(rows["skipped"].items())]
    assert data.skipped == expected


@pytest.mark.parametrize("tokens", [False, True])
def test_round_trip_keeps_plan_order_and_lists_skipped_rows(tmp_path, tokens):
    out, plan, rows = build(tmp_path, tokens=tokens)
    with PartialCache.open(out, plan=plan) as partial:
        write_batches(partial, rows, partial.pending(), batch_size=4)
    assert finalize([partial_dir(out)], out) == out
    data = read_cache(out, tokens=tokens)
    assert_matches(data, plan, rows, tokens=tokens)
    assert data.attrs["format_version"] == 1 and data.attrs["complete"] is True
    assert data.attrs["fingerprint"] == plan.fingerprint and data.attrs["tokens"] is tokens
    assert data.attrs["text_model_revision"] == ""  # None has no HDF5 form
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.h5"]  # partial folder and .tmp are gone
    assert read_cache(out).splits["train"].text_tokens is None


def test_tokens_pad_to_longest_text_with_mask_false_on_padding(tmp_path):
    out = write_synthetic_cache(tmp_path / "c.h5", tokens=True, dt=DT, di=DI, batch_size=3)
    data = read_cache(out, tokens=True)
    lengths = np.concatenate([data.splits[split].text_mask.sum(axis=1) for split in SPLITS])
    assert data.splits["train"].text_tokens.shape[1] == lengths.max()
    for split in SPLITS:
        arrays = data.splits[split]
        assert not arrays.text_tokens[~arrays.text_mask].any()
        np.testing.assert_array_equal(arrays.text_tokens[:, 0], arrays.text)


def test_token_rows_reads_any_rows_in_the_order_asked(tmp_path):
    out = write_synthetic_cache(tmp_path / "c.h5", (15, 6, 6), tokens=True, dt=DT, di=DI, batch_size=3)
    data = read_cache(out, tokens=True)
    rng = np.random.default_rng(0)
    with TokenRows(out) as reader:
        for split in SPLITS:
            arrays = data.splits[split]
            order = rng.permutation(len(arrays.text))
            for index in (order, order[:1], slice(1, 4)):
                rows = reader.rows(split, index)
                for name in ("text_tokens", "text_mask", "image_tokens"):
                    np.testing.assert_array_equal(rows[name], getattr(arrays, name)[index])
    with pytest.raises(CacheError, match="closed"):
        reader.rows("train", slice(0, 1))


def test_token_rows_names_a_damaged_row(tmp_path):
    out = write_synthetic_cache(tmp_path / "c.h5", (6, 2, 2), tokens=True, dt=DT, di=DI)
    _flip_a_byte_in_chunk(out, "train/image_tokens", 2)
    with TokenRows(out) as reader:
        reader.rows("train", np.array([0, 1]))
        with pytest.raises(CacheError, match="train/image_tokens row 2: checksum mismatch"):
            reader.rows("train", np.array([3, 2]))
    with h5py.File(out, "r+") as h5:  # a NaN written through HDF5 has a valid checksum: the value check finds it
        h5["val/text_tokens"][1, 0, 3] = np.inf
    with TokenRows(out) as reader:
        with pytest.raises(CacheError, match=r"val/text_tokens has NaN or Inf in 1 row\(s\) \(first: row 1\)"):
            reader.rows("val", np.array([0, 1]))


def test_resume_after_some_batches_gives_the_rest(tmp_path):
    out, plan, rows = build(tmp_path)
    with PartialCache.open(out, plan=plan) as partial:
        first = partial.pending()[:7]
        write_batches(partial, rows, first, batch_size=3)
    with PartialCache.open(out, plan=plan) as partial:
        rest = partial.pending()
        np.testing.assert_array_equal(rest, np.setdiff1d(np.arange(len(plan.ids)), first))
        np.testing.assert_array_equal(partial.pending(5, 12), rest[(rest >= 5) & (rest < 12)])
    with pytest.raises(CacheError, match=f"{len(rest)} of 20 rows are not computed yet"):
        finalize([partial_dir(out)], out)
    with PartialCache.open(out, plan=plan) as partial:
        write_batches(partial, rows, partial.pending())
    finalize([partial_dir(out)], out)
    assert_matches(read_cache(out), plan, rows)


def test_unfinished_and_damaged_batch_files_are_never_trusted(tmp_path):
    out, plan, rows = build(tmp_path, n_skipped=0)
    with PartialCache.open(out, plan=plan) as partial:
        partial.write_batch(np.arange(0, 4), batch_arrays(rows, np.arange(0, 4)), {})
        partial.write_batch(np.arange(4, 8), batch_arrays(rows, np.arange(4, 8)), {})
    directory = partial_dir(out)
    (directory / f".tmp-r0000-999-{batch_name(0, 8)}").write_bytes(b"PK\x03\x04 killed mid-write")
    damaged = directory / batch_name(0, 4)
    damaged.write_bytes(damaged.read_bytes()[:100])
    with PartialCache.open(out, plan=plan) as partial:
        np.testing.assert_array_equal(partial.pending()[:2], [4, 5])
        assert sorted(p.name for p in directory.glob("*.npz")) == [batch_name(0, 0)]
        write_batches(partial, rows, partial.pending())
    finalize([directory], out)
    assert_matches(read_cache(out), plan, rows)


def test_partial_made_for_other_settings_is_refused(tmp_path):
    out, plan, _ = build(tmp_path)
    PartialCache.open(out, plan=plan).close()
    other = Plan(fingerprint="f" * 64, attrs=plan.attrs, ids=plan.ids, splits=plan.splits, labels=plan.labels)
    with pytest.raises(CacheError, match="made for other settings.*delete it or use --out"):
        PartialCache.open(out, plan=other)
    PartialCache.open(out, plan=plan).close()  # the refusal left the lock free


def test_second_writer_is_locked_out(tmp_path):
    out, plan, _ = build(tmp_path)
    with PartialCache.open(out, plan=plan):
        with pytest.raises(CacheLockedError, match=r"another fusion process is writing .*cache\.h5 \(lock .*rank0"):
            PartialCache.open(out, plan=plan)
        PartialCache.open(out, plan=plan, rank=1).close()  # other ranks write beside it
        script = ("import sys; from pathlib import Path; from fusion.cache.partial import *; "
                  "from fusion.errors import CacheLockedError\n"
                  "try: PartialCache.open(Path(sys.argv[1]), plan=read_plan(Path(sys.argv[2])))\n"
                  "except CacheLockedError as e: print(e); sys.exit(3)")
        done = subprocess.run([sys.executable, "-c", script, str(out), str(partial_dir(out))], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 3 and "another fusion process" in done.stdout, done.stderr
    PartialCache.open(out, plan=plan).close()


def test_two_ranks_in_one_folder_merge_in_plan_order(tmp_path):
    out, plan, rows = build(tmp_path)
    half = len(plan.ids) // 2
    ranks = [PartialCache.open(out, plan=plan, rank=rank) for rank in (0, 1)]
    write_batches(ranks[1], rows, ranks[1].pending(half), seed=1)
    write_batches(ranks[0], rows, ranks[0].pending(0, half), seed=2)
    with pytest.raises(CacheLockedError):
        finalize([partial_dir(out)], out)  # rank 0 still holds its lock
    for partial in ranks:
        partial.close()
    finalize([partial_dir(out)], out)
    assert_matches(read_cache(out), plan, rows)


def test_separate_partial_folders_merge(tmp_path):
    out, plan, rows = build(tmp_path)
    other_out = tmp_path / "elsewhere" / "cache.h5"
    with PartialCache.open(out, plan=plan) as first, PartialCache.open(other_out, plan=plan, rank=1) as second:
        write_batches(first, rows, np.arange(0, 9))
        write_batches(second, rows, np.arange(9, len(plan.ids)))
    finalize([partial_dir(out), partial_dir(other_out)], out)
    assert_matches(read_cache(out), plan, rows)
    assert not partial_dir(other_out).exists()


def test_empty_split_gets_zero_row_arrays(tmp_path):
    out = write_synthetic_cache(tmp_path / "c.h5", n_per_split=(6, 0, 3), dt=DT, di=DI, n_skipped=0, tokens=True)
    val = read_cache(out, tokens=True).splits["val"]
    assert val.text.shape == (0, DT) and val.image.shape == (0, DI) and val.label.shape == (0,)
    assert val.text_tokens.shape[0] == 0 and val.id.shape == (0,)
    assert cache_info(out)["splits"]["val"] == {"count": 0, "per_class": {name: 0 for name in LABELS}}


def test_skipped_rows_may_have_no_label_but_embedded_rows_must(tmp_path):
    out, plan, rows = build(tmp_path, n_skipped=1)
    (skipped_row,) = rows["skipped"]
    labels = list(plan.labels)
    labels[skipped_row] = -1  # the pipeline's label for a sample already dropped while reading the dataset
    unlabelled = Plan(plan.fingerprint, plan.attrs, plan.ids, plan.splits, labels)
    with PartialCache.open(out, plan=unlabelled) as partial:
        write_batches(partial, rows, partial.pending())
    finalize([partial_dir(out)], out)
    assert read_skipped(out)[0][0] == plan.ids[skipped_row]
    labels[(skipped_row + 1) % len(labels)] = -1
    out2 = tmp_path / "c2.h5"
    with PartialCache.open(out2, plan=Plan("x", plan.attrs, plan.ids, plan.splits, labels)) as partial:
        write_batches(partial, rows, partial.pending())
    with pytest.raises(CacheError, match="has label -1 but was embedded"):
        finalize([partial_dir(out2)], out2)


def test_nan_from_the_encoder_is_refused_when_written(tmp_path):
    out, plan, rows = build(tmp_path, n_skipped=0)
    arrays = batch_arrays(rows, np.arange(3))
    arrays["image"][1, 2] = np.inf
    with PartialCache.open(out, plan=plan) as partial, pytest.raises(CacheError, match="NaN or Inf in image"):
        partial.write_batch(np.arange(3), arrays, {})


def test_fingerprint_depends_on_settings_files_and_version(tmp_path, monkeypatch):
    labels = tmp_path / "labels.txt"
    labels.write_text("1,positive\n")
    base = fingerprint({"a": 1, "b": [1, 2]}, [labels])
    assert fingerprint({"b": [1, 2], "a": 1}, [labels]) == base and len(base) == 64
    assert fingerprint({"a": 2, "b": [1, 2]}, [labels]) != base
    assert fingerprint({"a": 1, "b": [1, 2]}, []) != base
    labels.write_text("1,negative\n")
    assert fingerprint({"a": 1, "b": [1, 2]}, [labels]) != base
    labels.write_text("1,positive\n")
    monkeypatch.setattr(fusion.cache.fingerprint, "__version__", "9.9.9")
    assert fingerprint({"a": 1, "b": [1, 2]}, [labels]) != base
    with pytest.raises(CacheError, match="missing.txt"):
        fingerprint({}, [tmp_path / "missing.txt"])


@pytest.fixture
def cache_file(tmp_path):
    return write_synthetic_cache(tmp_path / "c.h5", dt=DT, di=DI)


def edit(path, change):
    with h5py.File(path, "r+") as h5:
        change(h5)


def replace(h5, name, data):
    del h5[name]
    h5.create_dataset(name, data=data)


def flip_byte_in_chunk(path, dataset):
    with h5py.File(path, "r") as h5:
        offset = h5[dataset].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as handle:
        handle.seek(offset + 3)
        byte = handle.read(1)[0]
        handle.seek(offset + 3)
        handle.write(bytes([byte ^ 0x5A]))


BAD_CACHES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]), "truncated or damaged"),
    "not hdf5": (lambda p: p.write_text("id,label\n"), "not an HDF5 file"),
    "checksum": (lambda p: flip_byte_in_chunk(p, "val/image"), "cannot read val/image: checksum mismatch"),
    "version 2": (lambda p: edit(p, lambda h5: h5.attrs.modify("format_version", 2)),
                  "format version 2, but this fusion reads version 1"),
    "incomplete": (lambda p: edit(p, lambda h5: h5.attrs.modify("complete", False)),
                   "incomplete cache.*resume `fusion extract`"),
    "no complete attr": (lambda p: edit(p, lambda h5: h5.attrs.__delitem__("complete")), "incomplete cache"),
    "missing group": (lambda p: edit(p, lambda h5: h5.__delitem__("val")), "missing group 'val'"),
    "missing dataset": (lambda p: edit(p, lambda h5: h5.__delitem__("test/label")), "missing dataset 'test/label'"),
    "missing skipped": (lambda p: edit(p, lambda h5: h5.__delitem__("skipped")), "missing group 'skipped'"),
    "nan": (lambda p: edit(p, lambda h5: h5["train/text"].__setitem__((2, 0), np.nan)),
            "train/text has NaN or Inf in 1 row"),
    "label range": (lambda p: edit(p, lambda h5: h5["val/label"].__setitem__(0, 3)), "val/label has 1 value.* 0..2"),
    "rows differ": (lambda p: edit(p, lambda h5: replace(h5, "train/image", h5["train/image"][1:])),
                    "train/image has 10 rows but train/text has 11"),
    "dims differ": (lambda p: edit(p, lambda h5: replace(h5, "test/text", np.zeros((len(h5["test/text"]), DT + 1),
                                                                             np.float16))),
                    f"test has text dim {DT + 1} but train has {DT}"),
    "flat text": (lambda p: edit(p, lambda h5: replace(h5, "val/text", h5["val/text"][:, 0])),
                  "val/text has shape \\(\\d+,\\), expected 2 axes"),
}


@pytest.mark.parametrize("case", list(BAD_CACHES))
def test_every_damaged_cache_gets_its_own_one_line_message(cache_file, case):
    damage, message = BAD_CACHES[case]
    assert read_cache(cache_file).splits["train"].text.shape == (11, DT)  # the fixture's counts the cases rely on
    damage(cache_file)
    with pytest.raises(CacheError, match=message) as error:
        read_cache(cache_file)
    assert str(cache_file) in str(error.value) and "\n" not in str(error.value)
    assert not is_complete_cache(cache_file, "synthetic-0-16-24-0-12-4-4") or case in ("checksum", "nan",
                                                                                         "label range")


def test_missing_cache_points_at_the_partial_folder(tmp_path):
    with pytest.raises(CacheError, match="no such cache file .*run `fusion extract`"):
        read_cache(tmp_path / "nothing.h5")
    partial_dir(tmp_path / "nothing.h5").mkdir()
    with pytest.raises(CacheError, match="interrupted run .*resume"):
        read_cache(tmp_path / "nothing.h5")


def test_tokens_requested_from_a_pooled_cache(cache_file):
    with pytest.raises(CacheError, match="--tokens"):
        read_cache(cache_file, tokens=True)


def test_is_complete_cache_checks_the_fingerprint(cache_file):
    fingerprint_written = read_cache(cache_file).attrs["fingerprint"]
    assert is_complete_cache(cache_file, fingerprint_written)
    assert not is_complete_cache(cache_file, "other")
    assert not is_complete_cache(cache_file.with_name("absent.h5"), fingerprint_written)


def test_cache_info_counts_per_class_and_skipped_reasons(tmp_path):
    out, plan, rows = build(tmp_path, n_per_split=(15, 6, 6), n_skipped=4)
    with PartialCache.open(out, plan=plan) as partial:
        write_batches(partial, rows, partial.pending()[:10])
    partial_view = cache_info(out)  # no final file yet: the partial folder is reported
    assert partial_view == cache_info(partial_dir(out))
    with pytest.raises(CacheError, match="work folder of an interrupted run"):
        read_cache(partial_dir(out))
    assert partial_view["complete"] is False and (partial_view["rows_done"], partial_view["rows_total"]) == (10, 27)
    with PartialCache.open(out, plan=plan) as partial:
        write_batches(partial, rows, partial.pending())
    finalize([partial_dir(out)], out)
    info = json.loads(json.dumps(cache_info(out)))
    labels = np.asarray(plan.labels)
    for split in SPLITS:
        wanted = labels[expected_split(plan, rows, split)]
        assert info["splits"][split] == {"count": len(wanted), "per_class": {
            name: int((wanted == number).sum()) for number, name in enumerate(LABELS)}}
    reasons = list(rows["skipped"].values())
    assert info["skipped"] == {"count": 4, "reasons": {r: reasons.count(r) for r in set(reasons)}}
    assert info["dims"] == {"text": DT, "image": DI} and info["complete"] is True and info["rows_total"] == 27
    assert (info["dataset"], info["fingerprint"], info["tokens"]) == ("synthetic", plan.fingerprint, False)


def test_cache_info_reports_an_incomplete_file_instead_of_refusing(cache_file):
    edit(cache_file, lambda h5: h5.attrs.modify("complete", False))
    info = cache_info(cache_file)
    assert info["complete"] is False and info["splits"]["train"]["count"] == 11


def _flip_a_byte_in_chunk(path: Path, dataset: str, chunk: int) -> None:
    with h5py.File(path, "r") as h5:
        offset = h5[dataset].id.get_chunk_info(chunk).byte_offset
    with open(path, "r+b") as file:
        file.seek(offset + 3)
        byte = file.read(1)
        file.seek(offset + 3)
        file.write(bytes([byte[0] ^ 0x40]))


def test_cache_info_verify_reads_every_chunk_and_names_each_damaged_dataset(tmp_path, capsys):
    from fusion.cli import main

    out = write_synthetic_cache(tmp_path / "c.h5", (8, 3, 3), tokens=True, dt=DT, di=DI)
    assert main(["cache", "info", str(out), "--verify"]) == 0
    assert "every checksum matches" in capsys.readouterr().out
    _flip_a_byte_in_chunk(out, "train/image_tokens", 2)
    _flip_a_byte_in_chunk(out, "test/text_tokens", 0)
    assert main(["cache", "info", str(out)]) == 0  # metadata and labels only: the damage is not seen
    capsys.readouterr()
    assert main(["cache", "info", str(out), "--verify", "--json"]) == 1
    captured = capsys.readouterr()
    damaged = json.loads(captured.out)["verified"]["damaged"]
    assert sorted(damaged) == ["test/text_tokens", "train/image_tokens"]
    assert all("checksum mismatch" in reason for reason in damaged.values())
    assert len(captured.err.strip().splitlines()) == 2 and "train/image_tokens: checksum mismatch" in captured.err


def test_finalize_leaves_nothing_half_written_when_a_batch_is_damaged(tmp_path):
    out, plan, rows = build(tmp_path)
    with PartialCache.open(out, plan=plan) as partial:
        write_batches(partial, rows, partial.pending())
    victim = sorted(partial_dir(out).glob("batch-*.npz"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside an embedding array: the header scan passes, the zip CRC does not
    victim.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="damaged batch file"):
        finalize([partial_dir(out)], out)
    assert not out.exists() and not out.with_name("cache.h5.tmp").exists() and partial_dir(out).is_dir()
    shutil.rmtree(partial_dir(out))


def test_kill_9_while_writing_then_resume_gives_the_same_cache(tmp_path):
    out, plan, rows = build(tmp_path, n_per_split=(200, 50, 50), n_skipped=5)
    script = ("import sys, time; from pathlib import Path; from cache_fixtures import *; "
              "from fusion.cache.partial import PartialCache\n"
              "plan = synthetic_plan((200, 50, 50), dt=16, di=24); rows = synthetic_rows(plan, dt=16, di=24, "
              "n_skipped=5)\n"
              "p = PartialCache.open(Path(sys.argv[1]), plan=plan)\n"
              "while True: write_batches(p, rows, p.pending()[:1], batch_size=1)\n")
    writer = subprocess.Popen([sys.executable, "-c", script, str(out)], cwd=str(tmp_path),
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    try:
        deadline = time.monotonic() + 60
        while len(list(partial_dir(out).glob("batch-*.npz"))) < 20 and writer.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        writer.kill()  # SIGKILL: no cleanup, possibly mid-write
    finally:
        writer.wait(timeout=60)
    with PartialCache.open(out, plan=plan) as partial:
        assert 0 < len(partial.pending()) < len(plan.ids)
        write_batches(partial, rows, partial.pending(), batch_size=16)
    finalize([partial_dir(out)], out)
    assert_matches(read_cache(out), plan, rows)
