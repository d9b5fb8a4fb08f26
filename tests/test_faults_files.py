"""Damaged files: every byte of a cache is covered (data by fletcher32, metadata by the HDF5 1.10 checksums), a
truncated cache is refused, the CLI says so in one line, and a damaged work folder is refused without losing the
batches already computed. tests/test_cache.py has the per-message cases; this file attacks whole files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from cache_fixtures import synthetic_plan, synthetic_rows, write_batches, write_synthetic_cache
from dataset_writers import write_mvsa
from fault_helpers import FIGURES, damage, print_figures
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion.cache.partial import PartialCache, partial_dir, read_plan
from fusion.cache.reader import read_cache
from fusion.cli import main
from fusion.errors import CacheError

DATASETS = [f"{split}/{name}" for split in ("train", "val", "test")
            for name in ("text", "image", "label", "id", "text_tokens", "text_mask", "image_tokens")]
DATASETS += ["skipped/id", "skipped/split", "skipped/reason"]


@pytest.fixture(scope="module", autouse=True)
def figures():
    start = FIGURES.copy()
    yield
    print_figures(__name__, start)


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("files") / "c.h5", (9, 4, 4), tokens=True, n_skipped=3)


@pytest.fixture
def cache_copy(token_cache, tmp_path):
    copy = tmp_path / "c.h5"
    copy.write_bytes(token_cache.read_bytes())
    return copy


def flip_in_chunk(path: Path, dataset: str) -> None:
    with h5py.File(path, "r") as h5:
        info = h5[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset + info.size // 2)
        byte = handle.read(1)[0]
        handle.seek(info.byte_offset + info.size // 2)
        handle.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("dataset", DATASETS)
def test_a_flipped_byte_in_any_dataset_is_named(cache_copy, dataset):
    flip_in_chunk(cache_copy, dataset)
    with pytest.raises(CacheError) as error:
        read_cache(cache_copy, tokens=True)
    message = str(error.value)
    assert f"cannot read {dataset}: checksum mismatch" in message and str(cache_copy) in message
    assert "\n" not in message
    FIGURES["damaged caches refused"] += 1


def test_a_flip_anywhere_or_a_cut_anywhere_is_refused_or_harmless(token_cache, tmp_path):
    """Hundreds of single-bit flips at random offsets and cuts at evenly spaced lengths, each read in full: never
    a traceback, a hang or a silently different value (run in a subprocess so that a hang cannot stall pytest)."""
    source = tmp_path / "survey.h5"
    source.write_bytes(token_cache.read_bytes())
    script = "import sys, fault_helpers; fault_helpers.damage_survey(sys.argv[1], 300, 40, 11)"
    done = subprocess.run([sys.executable, "-c", script, str(source)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, f"stuck or crashed after: {done.stdout.splitlines()[-1:]} {done.stderr[-2000:]}"
    tally = json.loads(done.stdout.splitlines()[-1])
    assert set(tally) <= {"flip same", "flip refused", "cut refused"}, tally
    assert tally["cut refused"] == 40 and tally["flip refused"] > 200
    FIGURES["damaged caches refused"] += tally["flip refused"] + tally["cut refused"]
    FIGURES["damaged caches harmless (flip in unused bytes)"] += tally.get("flip same", 0)


@pytest.mark.parametrize("damage", ["truncated", "flipped label", "flipped header"])
def test_cache_info_on_a_damaged_cache_says_so_in_one_line(cache_copy, damage, capsys):
    if damage == "truncated":
        cache_copy.write_bytes(cache_copy.read_bytes()[: cache_copy.stat().st_size * 2 // 3])
    elif damage == "flipped label":
        flip_in_chunk(cache_copy, "val/label")
    else:  # inside the root group's header, where the attributes are stored
        data = bytearray(cache_copy.read_bytes())
        offset = data.index(b"fingerprint")
        data[offset] ^= 0x01
        cache_copy.write_bytes(bytes(data))
    assert main(["cache", "info", str(cache_copy)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(cache_copy) in err and "Traceback" not in err, err
    FIGURES["damaged caches refused"] += 1


# ---------------------------------------------------------------- the work folder of an interrupted run


@pytest.fixture(scope="module")
def half_done(tmp_path_factory):
    """A partial folder with some batches written: (out, plan, its plan.json text, batch file names)."""
    out = tmp_path_factory.mktemp("half") / "c.h5"
    plan = synthetic_plan((9, 4, 4))
    rows = synthetic_rows(plan)
    with PartialCache.open(out, plan=plan) as partial:
        write_batches(partial, rows, partial.pending()[:8], batch_size=3)
    directory = partial_dir(out)
    return out, plan, (directory / "plan.json").read_text(), sorted(p.name for p in directory.glob("batch-*"))


def json_values():
    return st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3), max_leaves=6)


@st.composite
def damaged_plans(draw, text: str) -> str:
    """plan.json cut short, with a character changed, or with one top-level value replaced or removed."""
    kind = draw(st.sampled_from(["cut", "char", "value", "drop", "garbage"]))
    if kind == "cut":
        return text[:draw(st.integers(0, len(text) - 1))]
    if kind == "char":
        at = draw(st.integers(0, len(text) - 1))
        return text[:at] + draw(st.characters(blacklist_categories=("Cs",))) + text[at + 1:]
    if kind == "garbage":
        return draw(st.text(max_size=40))
    body = json.loads(text)
    key = draw(st.sampled_from(sorted(body)))
    if kind == "drop":
        del body[key]
    else:
        body[key] = draw(json_values())
    return json.dumps(body)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_plan_is_refused_in_one_line_and_no_batch_is_lost(half_done, data):
    out, plan, text, batches = half_done
    directory = partial_dir(out)
    damaged = data.draw(damaged_plans(text))
    (directory / "plan.json").write_text(damaged, encoding="utf-8")
    FIGURES["generated bad inputs tried"] += 1
    try:
        try:
            with PartialCache.open(out, plan=plan) as partial:
                accepted = read_plan(directory)
                assert (accepted.fingerprint, accepted.ids, accepted.splits, accepted.labels) == (
                    plan.fingerprint, plan.ids, plan.splits, plan.labels)
                assert accepted.attrs == plan.attrs, "a plan with other attributes was accepted"
                assert len(partial.pending()) == len(plan.ids) - 8
        except CacheError as error:
            assert "\n" not in str(error) and str(directory) in str(error)
        assert sorted(p.name for p in directory.glob("batch-*")) == batches
    finally:
        (directory / "plan.json").write_text(text, encoding="utf-8")


def test_extract_with_a_damaged_plan_or_final_file_stops_in_one_line_and_keeps_everything(tmp_path, tiny_models,
                                                                                          capsys):
    bert, dinov2 = tiny_models
    expected = write_mvsa(tmp_path / "data", kind="single", n_per_class=2, dirty=False)
    out = tmp_path / "c.h5"
    argv = ["extract", "--dataset", "mvsa-single", "--root", str(expected.root), "--out", str(out), "--text-model",
            str(bert), "--image-model", str(dinov2), "--device", "cpu", "--workers", "0", "--batch-size", "2"]
    assert main(argv) == 0
    final_bytes = out.read_bytes()
    damaged = bytearray(final_bytes)
    damaged[len(damaged) // 2] ^= 0xFF
    out.write_bytes(bytes(damaged))
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "damaged" in err, err
    assert out.read_bytes() == bytes(damaged)  # not overwritten: the user decides
    out.unlink()
    # An interrupted run's folder whose plan was damaged: refused, and its batches stay for the user to inspect.
    directory = partial_dir(out)
    directory.mkdir()
    (directory / "plan.json").write_text('{"partial_format": 1, "fingerprint": ')
    (directory / "batch-r0000-000000000000.npz").write_bytes(b"PK\x03\x04")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged plan" in err and str(directory) in err, err
    assert (directory / "batch-r0000-000000000000.npz").exists()


# ---------------------------------------------------------------- run directories (stage 2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import torch
    from synthetic import xor_features

    from fusion.heads.checkpoint import save_run
    from fusion.heads.config import FitConfig
    from fusion.heads.train import train_head

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        features = xor_features({"train": 120, "val": 40, "test": 40})
        result = train_head(features, FitConfig(head="dual_attn", epochs=2, proj_dim=16, hidden=16, batch_size=32))
    finally:
        torch.set_num_threads(threads)
    run = save_run(tmp_path_factory.mktemp("run") / "run", result, cache_path="c.h5", fingerprint="f", dims=(6, 4))
    return run, {name: (run / name).read_bytes() for name in ("config.json", "metrics.json", "head.safetensors")}


def _load_run_outcome(run: Path, damaged: str) -> str:
    from fusion.errors import RunError
    from fusion.heads.checkpoint import load_run

    try:
        load_run(run)
    except RunError as error:
        message = str(error)
        assert "\n" not in message and str(run) in message, message
        return "refused"
    return "loaded"


@st.composite
def damaged_bytes(draw, original: bytes) -> bytes:
    return damage(draw, original, max_edits=4, garbage_size=300)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), target=st.sampled_from(["config.json", "metrics.json", "head.safetensors",
                                                "head.safetensors with its hash updated"]))
def test_a_damaged_or_altered_run_directory_is_refused_with_the_reason(run_dir, data, target):
    """Weights: any change is refused by the sha256 in config.json; with the hash updated too (a deliberate edit),
    the safetensors parser and the shape checks still refuse anything malformed, in one line."""
    import hashlib

    run, originals = run_dir
    name = target.split(" ")[0]
    try:
        if name == "config.json" and data.draw(st.booleans()):
            damaged = data.draw(damaged_plans(originals[name].decode())).encode()  # JSON-aware damage
        else:
            damaged = data.draw(damaged_bytes(originals[name]))
        (run / name).write_bytes(damaged)
        if target.endswith("updated"):
            config = json.loads(originals["config.json"])
            config["head_sha256"] = hashlib.sha256(damaged).hexdigest()
            (run / "config.json").write_text(json.dumps(config))
        FIGURES["generated bad inputs tried"] += 1
        outcome = _load_run_outcome(run, name)
        if name == "head.safetensors" and not target.endswith("updated"):
            assert outcome == "refused"
        FIGURES[f"run files {outcome}"] += 1
    finally:
        for file, content in originals.items():
            (run / file).write_bytes(content)


def test_predict_with_an_altered_run_stops_in_one_line(run_dir, tmp_path, capsys):
    run, originals = run_dir
    weights = bytearray(originals["head.safetensors"])
    weights[-3] ^= 0x40
    (run / "head.safetensors").write_bytes(bytes(weights))
    (tmp_path / "x.jpg").write_bytes(b"an image predict never reads: the run is refused first")
    try:
        assert main(["predict", "--run", str(run), "--text", "good day", "--image", str(tmp_path / "x.jpg")]) == 1
    finally:
        (run / "head.safetensors").write_bytes(originals["head.safetensors"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "head.safetensors: altered" in err, err
