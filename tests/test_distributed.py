"""`torchrun --nproc-per-node 2 -m fusion.cli extract` on CPU (gloo): the cache equals a single-process run, bit for
bit, and a rank killed mid-way resumes from its finished batches when the command is run again. On a simulated GPU
machine (torch.cuda monkeypatched): the process group is gloo, each rank's device, and the refusals."""

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


# ---------------------------------------------------------------- device and backend, on a simulated GPU machine


@pytest.fixture
def gpus(monkeypatch):
    """torch sees `gpus.count` CUDA devices (none exist: nothing may really run on them); set_device is recorded."""
    class Gpus:
        count = 2
        current = 0
        set_to: list[int] = []

    fake = Gpus()
    fake.set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: fake.count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: fake.set_to.append(int(index)))
    for name in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    return fake


def torchrun_env(monkeypatch, local_rank: int, world_size: int = 2) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world_size))


def test_the_process_group_is_gloo_even_where_cuda_is_visible(gpus, monkeypatch):
    import torch.distributed as dist

    from fusion.extract import distributed

    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroyed"))
    torchrun_env(monkeypatch, local_rank=1)
    with distributed.distributed_context() as (rank, world_size):
        assert (rank, world_size) == (1, 2)
    assert calls[0]["backend"] == "gloo" and calls[-1] == "destroyed"
    assert gpus.set_to == []  # the process group itself chooses no GPU


@pytest.mark.parametrize("device, local_rank, count, expected", [
    ("cuda", 1, 2, "cuda:1"),     # one GPU per rank
    ("auto", 1, 2, "cuda:1"),
    ("cuda", 1, 1, "cuda:0"),     # two ranks sharing one GPU
    ("cuda", 3, 1, "cuda:0"),     # a SLURM task that sees only its own GPU
    ("cuda", 3, 2, "cuda:1"),     # more ranks than GPUs: wrapped
    ("cpu", 1, 2, "cpu"),         # --device cpu on a GPU machine
    ("auto", 1, 0, "cpu"),
])
def test_each_rank_takes_cuda_local_rank_wrapped_onto_the_visible_gpus(gpus, monkeypatch, device, local_rank,
                                                                        count, expected):
    from fusion.extract.distributed import rank_device
    from fusion.device import resolve_device, use_device

    gpus.count = count
    torchrun_env(monkeypatch, local_rank=local_rank, world_size=4)
    chosen = rank_device(device, world_size=4)
    assert chosen == expected
    target = resolve_device(chosen)
    assert str(target) == expected
    use_device(target)
    assert gpus.set_to == ([int(expected.split(":")[1])] if expected.startswith("cuda") else [])


def test_a_single_process_keeps_its_device_and_cuda_means_the_current_gpu(gpus):
    from fusion.extract.distributed import rank_device
    from fusion.device import resolve_device

    gpus.current = 1
    assert rank_device("cuda", world_size=1) == "cuda" and resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cpu") == torch.device("cpu")


def test_an_explicit_gpu_with_several_ranks_is_refused_in_one_line(gpus, monkeypatch):
    from fusion.errors import FusionError
    from fusion.extract.distributed import rank_device

    torchrun_env(monkeypatch, local_rank=0)
    with pytest.raises(FusionError, match="every rank on one GPU") as refused:
        rank_device("cuda:1", world_size=2)
    assert "\n" not in str(refused.value) and "--device cuda" in str(refused.value)


@pytest.mark.parametrize("device, message", [("cuda:2", "sees 2 GPU"), ("cuda:7", "cuda:0..cuda:1"),
                                             ("gpu", "unknown device"), ("mps", "unknown device")])
def test_a_gpu_past_the_count_or_an_unknown_device_is_refused_in_one_line(gpus, device, message):
    from fusion.errors import FusionError
    from fusion.device import resolve_device

    with pytest.raises(FusionError, match=message) as refused:
        resolve_device(device)
    assert "\n" not in str(refused.value)
    assert gpus.set_to == []


def test_cuda_without_a_gpu_is_refused_under_torchrun_too(gpus, monkeypatch):
    from fusion.errors import FusionError
    from fusion.extract.distributed import rank_device
    from fusion.device import resolve_device

    gpus.count = 0
    torchrun_env(monkeypatch, local_rank=1)
    with pytest.raises(FusionError, match="sees no CUDA device"):
        resolve_device(rank_device("cuda", world_size=2))


def test_the_sum_over_ranks_is_a_cpu_tensor_whatever_the_device(monkeypatch):
    import torch.distributed as dist

    from fusion.extract.distributed import sum_over_ranks

    reduced = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: reduced.append(tensor.device.type) or tensor.mul_(2))
    assert sum_over_ranks(21) == 42 and reduced == ["cpu"]
