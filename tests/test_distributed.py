"""`torchrun --nproc-per-node 2 -m fusion.cli extract` on CPU (gloo): the cache equals a single-process run, bit for
bit, and a rank killed mid-way resumes from its finished batches when the command is run again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from dataset_writers import write_mvsa

from fusion.cache.reader import read_cache
from fusion.cli import main

ARRAYS = ("text", "image", "label", "id", "text_tokens", "text_mask", "image_tokens")
# Rank `CRASH_RANK` kills itself with SIGKILL right after writing its CRASH_AFTER-th batch file (a deterministic
# stand-in for a machine dying mid-run); every rank logs the rows of each batch file it writes.
CRASHING_CLI = textwrap.dedent("""
    import json, os, signal, sys
    from fusion.cache.partial import PartialCache
    from fusion.cli import main

    original, written = PartialCache.write_batch, []

    def write_batch(self, indices, arrays, skipped):
        original(self, indices, arrays, skipped)
        written.append(1)
        with open(os.environ["WRITE_LOG"], "a") as log:
            log.write(json.dumps({"rank": self.rank, "rows": [int(i) for i in indices]}) + "\\n")
        if self.rank == int(os.environ["CRASH_RANK"]) and len(written) == int(os.environ["CRASH_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)

    PartialCache.write_batch = write_batch
    sys.exit(main())
""")


def extract_args(root, out, models) -> list[str]:
    bert, dinov2 = models
    return ["extract", "--dataset", "mvsa-single", "--root", str(root), "--out", str(out), "--text-model", str(bert),
            "--image-model", str(dinov2), "--device", "cpu", "--batch-size", "3", "--workers", "0", "--tokens"]


def torchrun(module: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Two CPU ranks on this machine; --standalone picks a free rendezvous port itself."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "0", "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def computed_line(output: str) -> str:
    found = re.search(r"computed \d+ of \d+ rows", output)
    assert found, output[-2000:]
    return found.group(0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 30 kept pairs, 3 dropped while reading (missing files) and 1 undecodable image: 9 batches of 3.
    return write_mvsa(tmp_path_factory.mktemp("dist") / "data", kind="single", n_per_class=10, seed=5, dirty=True)


@pytest.fixture(scope="module")
def reference(dataset, tiny_models, tmp_path_factory):
    """One process, one thread (as each torchrun rank runs), so only the sharding differs."""
    out = tmp_path_factory.mktemp("single") / "single.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from contextlib import redirect_stdout
        from io import StringIO

        printed = StringIO()
        with redirect_stdout(printed):
            assert main(extract_args(dataset.root, out, tiny_models)) == 0
    finally:
        torch.set_num_threads(threads)
    return out, computed_line(printed.getvalue())


def assert_same_cache(path, expected_path) -> None:
    a, b = read_cache(path, tokens=True), read_cache(expected_path, tokens=True)
    assert a.skipped == b.skipped and a.attrs["fingerprint"] == b.attrs["fingerprint"]
    for split in a.splits:
        for name in ARRAYS:
            np.testing.assert_array_equal(getattr(a.splits[split], name), getattr(b.splits[split], name),
                                          err_msg=f"{split}/{name}")


def test_two_ranks_write_the_same_cache_as_one_process(dataset, tiny_models, reference, tmp_path):
    out = tmp_path / "two-ranks.h5"
    done = torchrun("fusion.cli", extract_args(dataset.root, out, tiny_models))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_cache(out, reference[0])
    assert computed_line(done.stdout) == reference[1]  # rank 0 reports the rows of both ranks
    assert not (tmp_path / "two-ranks.h5.partial").exists()


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_killed_rank_resumes_from_its_batches_when_the_job_is_run_again(dataset, tiny_models, reference, tmp_path):
    (tmp_path / "crashing_cli.py").write_text(CRASHING_CLI)
    out, first_log, second_log = tmp_path / "resumed.h5", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
           "CRASH_RANK": "1", "CRASH_AFTER": "2"}
    crashed = torchrun("crashing_cli", extract_args(dataset.root, out, tiny_models),
                       {**env, "WRITE_LOG": str(first_log)})
    assert crashed.returncode != 0 and not out.exists()
    assert len([entry for entry in read_log(first_log) if entry["rank"] == 1]) == 2
    assert len(list((tmp_path / "resumed.h5.partial").glob("batch-r0001-*.npz"))) == 2

    again = torchrun("crashing_cli", extract_args(dataset.root, out, tiny_models),
                     {**env, "CRASH_AFTER": "0", "WRITE_LOG": str(second_log)})
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_cache(out, reference[0])
    first = [row for entry in read_log(first_log) for row in entry["rows"]]
    second = [row for entry in read_log(second_log) for row in entry["rows"]]
    assert second and {entry["rank"] for entry in read_log(second_log)} >= {1}  # rank 1 had work left
    assert sorted(first + second) == sorted(set(first + second))  # no row was computed twice


def test_a_worker_restarted_on_a_shared_store_stops_with_advice_instead_of_hanging(monkeypatch):
    from fusion.errors import FusionError
    from fusion.extract.distributed import distributed_context

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with pytest.raises(FusionError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        with distributed_context():
            pass
