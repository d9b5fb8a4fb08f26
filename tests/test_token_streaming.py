"""A token cache larger than memory still trains: `fusion fit --tokens` reads each minibatch from disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cache_fixtures import write_synthetic_cache

from fusion.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# Trains one dual_attn epoch on token features in a fresh process; prints its RSS before loading the features and
# its peak RSS at the end, in bytes. The head is narrow, so its own activations are a few MB.
MEASURE = """
import re, sys
import torch
from fusion.heads.config import FitConfig
from fusion.heads.runs import load_features
from fusion.heads.train import train_head
torch.set_num_threads(1)
def memory(field):
    with open("/proc/self/status") as status:
        return int(re.search(field + r":\\s+(\\d+) kB", status.read()).group(1)) * 1024
def train(cache):
    features, _ = load_features(cache, tokens=True, stream=sys.argv[2] == "stream")
    train_head(features, FitConfig(head="dual_attn", epochs=1, batch_size=64, proj_dim=16, hidden=16))
train(sys.argv[3])  # a tiny cache first: what the first run sets up once (kernels, thread pools) is not data
before = memory("VmRSS")
train(sys.argv[1])
print(before, memory("VmHWM"))
"""
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report pytest's own peak.


def _rss_growth(cache, mode: str, warm_up) -> int:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(cache), mode, str(warm_up)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    before, peak = map(int, done.stdout.split()[-2:])
    return peak - before


def test_a_streamed_token_cache_trains_in_a_fraction_of_its_size(tmp_path):
    rows, dim, length = 6000 + 2 * 300, 64, 64
    cache = write_synthetic_cache(tmp_path / "c.h5", (6000, 300, 300), dt=dim, di=dim, tokens=True,
                                  text_length=length, patches=length, batch_size=500)
    warm_up = write_synthetic_cache(tmp_path / "tiny.h5", (60, 20, 20), dt=dim, di=dim, tokens=True,
                                    text_length=length, patches=length)
    token_bytes = 4 * rows * 2 * length * dim  # their float32 copy in memory: ~216 MB
    loaded = _rss_growth(cache, "load", warm_up)
    assert loaded > 0.9 * token_bytes  # the measurement sees a whole copy
    streamed = _rss_growth(cache, "stream", warm_up)
    assert streamed < 0.25 * token_bytes, f"peak RSS grew {streamed / 1e6:.0f} MB (loading: {loaded / 1e6:.0f} MB)"


def test_fit_streams_by_itself_when_tokens_would_not_fit(tmp_path, capsys, monkeypatch):
    cache = write_synthetic_cache(tmp_path / "c.h5", (40, 12, 12), dt=12, di=8, tokens=True)
    monkeypatch.setattr("fusion.heads.runs.available_memory", lambda: 1000)
    assert main(["fit", "--cache", str(cache), "--head", "dual_attn", "--tokens", "--epochs", "2",
                 "--out", str(tmp_path / "run")]) == 0
    assert "each minibatch is read from the cache" in capsys.readouterr().out
    streamed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    monkeypatch.setattr("fusion.heads.runs.available_memory", lambda: 1 << 40)
    assert main(["fit", "--cache", str(cache), "--head", "dual_attn", "--tokens", "--epochs", "2",
                 "--out", str(tmp_path / "run2")]) == 0
    assert "read from the cache" not in capsys.readouterr().out
    assert main(["fit", "--cache", str(cache), "--stream", "--out", str(tmp_path / "run3")]) == 1
    assert "add --tokens" in capsys.readouterr().err
    loaded = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert streamed["history"] == loaded["history"] and streamed["test"] == loaded["test"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["tokens"] is True


def test_grid_on_tokens_streams_and_records_tokens_with_its_best_run(tmp_path, capsys):
    cache = write_synthetic_cache(tmp_path / "c.h5", (40, 12, 12), dt=12, di=8, tokens=True)
    out = tmp_path / "grid"
    assert main(["grid", "--cache", str(cache), "--tokens", "--stream", "--heads", "dual_attn,basic", "--lrs",
                 "1e-2,1e-3", "--dropouts", "0", "--losses", "ce", "--epochs", "2", "--out", str(out)]) == 0
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 4
    assert json.loads((out / "best" / "config.json").read_text())["tokens"] is True


def test_a_damaged_row_met_while_streaming_stops_fit_with_one_line(tmp_path, capsys):
    import h5py

    cache = write_synthetic_cache(tmp_path / "c.h5", (40, 12, 12), dt=12, di=8, tokens=True)
    with h5py.File(cache, "r") as h5:
        offset = h5["train/image_tokens"].id.get_chunk_info(17).byte_offset
    with open(cache, "r+b") as file:
        file.seek(offset + 2)
        byte = file.read(1)
        file.seek(offset + 2)
        file.write(bytes([byte[0] ^ 0x10]))
    assert main(["fit", "--cache", str(cache), "--head", "dual_attn", "--tokens", "--stream", "--epochs", "1",
                 "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train/image_tokens row 17: checksum mismatch" in err
    assert not (tmp_path / "run").exists()
