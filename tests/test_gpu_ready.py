"""What the GPU path rests on, checked on the CPU: uint8 crops normalised on the device (and the processors that
cannot be split), the device type in the fingerprint, the writer thread, decode workers per rank and /dev/shm,
predict of an fp16 run on a CPU, and benchmarks/gpu_check.sh's preflight and import shim, its deadline (counted from
the start, a stuck step stopped, the JSON line always printed) and its serve step."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_writers import write_image, write_mvsa
from PIL import Image
from tiny_models import extract_argv
from transformers import BitImageProcessorPil, CLIPImageProcessorPil, ConvNextImageProcessorPil, ViTImageProcessorPil

from fusion.cli import main
from fusion.extract import batches
from fusion.extract.batch_writer import BatchWriter
from fusion.extract.embedding import embed_posts
from fusion.extract.encoders import load_encoders
from fusion.extract.pixels import SPLIT, WHOLE, PixelPipeline

REPO = Path(__file__).resolve().parents[1]
DINOV2_SMALL = dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                    resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])

pytestmark = pytest.mark.usefixtures("one_thread")


def photo(seed: int, size=(640, 480)) -> Image.Image:
    """Smooth colour fields with noise, like a photo's statistics (pure noise would hide resampling errors)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-10, 11, (size[1], size[0], 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def within_one_float16_step(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == np.float16 and a.shape == b.shape
    step = np.spacing(np.maximum(np.abs(a), np.abs(b)))
    assert (np.abs(a.astype(np.float32) - b.astype(np.float32)) <= step.astype(np.float32)).all()


# ---------------------------------------------------------------- uint8 crops, normalised on the device


def test_dinov2_small_preprocessing_splits_into_uint8_crops_and_device_normalisation():
    processor = BitImageProcessorPil(**DINOV2_SMALL)
    pixels = PixelPipeline.for_processor(processor)
    assert pixels.split and pixels.describe() == SPLIT
    for seed, size in ((1, (640, 480)), (2, (300, 900)), (3, (120, 90))):
        image = photo(seed, size)
        crop = pixels.crop(image)
        assert crop.dtype == torch.uint8 and crop.shape == (3, 224, 224)
        assert pixels.bytes_per_image(224) == crop.numel() == PixelPipeline(processor, split=False).bytes_per_image(
            224) / 4
        reference = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert (pixels.model_input(crop, torch.float32) - reference).abs().max() < 1e-5


def test_embeddings_from_uint8_crops_equal_the_float_path_within_float16_rounding(tiny_models, tmp_path):
    encoders = load_encoders(str(tiny_models[0]), str(tiny_models[1]), device="cpu")
    assert encoders.pixels.split and encoders.preprocessing()["pixels"] == SPLIT
    paths = [write_image(tmp_path / f"{i}.jpg", i, size=(40 + 7 * i, 31 + 5 * i)) for i in range(6)]
    whole = PixelPipeline(processor=encoders.image_processor, split=False)  # what extraction fed the model before
    crops = torch.stack([batches.image_pixels(path, encoders.pixels) for path in paths])
    floats = torch.stack([batches.image_pixels(path, whole) for path in paths])
    assert crops.dtype == torch.uint8 and floats.dtype == torch.float32
    token_ids = encoders.tokenizer(["good day", "not bad at all", "sad", "a b c d e f", "love it", "so so"])
    new = embed_posts(encoders, token_ids["input_ids"], crops, with_tokens=True)
    old = embed_posts(encoders, token_ids["input_ids"], floats, with_tokens=True)
    for name in ("image", "image_tokens", "text"):
        within_one_float16_step(new[name], old[name])


@pytest.mark.parametrize("processor", [
    ViTImageProcessorPil(size={"height": 32, "width": 32}),
    CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}),
    ConvNextImageProcessorPil(size={"shortest_edge": 32}),
], ids=["vit", "clip", "convnext"])
def test_other_image_models_processors_are_split_when_the_halves_reproduce_them(processor):
    pixels = PixelPipeline.for_processor(processor)
    assert pixels.split
    image = photo(5, (97, 131))
    reference = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert (pixels.model_input(pixels.crop(image), torch.float32) - reference).abs().max() < 1e-5


class IgnoresSwitches:
    """A processor that always returns normalised floats, whatever it is asked."""
    do_rescale, rescale_factor, do_normalize, image_mean, image_std = True, 1 / 255, True, [0.5] * 3, [0.5] * 3

    def __call__(self, images, return_tensors, **ignored):
        values = torch.from_numpy(np.asarray(images.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)
        return {"pixel_values": ((values / 255 - 0.5) / 0.5)[None]}


class OtherArithmetic(IgnoresSwitches):
    """Honours the switches, but its normalisation is not what its attributes say (as a custom processor may)."""

    def __call__(self, images, return_tensors, do_rescale=True, do_normalize=True):
        values = torch.from_numpy(np.array(images.resize((16, 16)))).permute(2, 0, 1)[None]
        return {"pixel_values": values if not (do_rescale or do_normalize) else (values / 255 - 0.4) / 0.5}


class NoSwitches:
    def __call__(self, images, return_tensors):
        return {"pixel_values": torch.zeros(1, 3, 8, 8)}


@pytest.mark.parametrize("processor", [IgnoresSwitches(), OtherArithmetic(), NoSwitches()],
                         ids=["ignores-switches", "other-arithmetic", "no-switches"])
def test_a_processor_the_halves_do_not_reproduce_runs_its_own_float_path(processor):
    pixels = PixelPipeline.for_processor(processor)
    assert not pixels.split and pixels.describe() == WHOLE
    image = photo(6, (50, 40))
    shipped = pixels.crop(image)
    assert shipped.dtype == torch.float32
    torch.testing.assert_close(pixels.model_input(shipped, torch.float32),
                               processor(images=image, return_tensors="pt")["pixel_values"][0])


def test_which_pixel_path_ran_and_the_device_type_are_in_the_fingerprint(tiny_models, tmp_path):
    from fusion.extract.datasets.registry import load_dataset
    from fusion.extract.pipeline import ExtractConfig, make_plan

    dataset = write_mvsa(tmp_path / "data", n_per_class=2, dirty=False)
    config = ExtractConfig(dataset="mvsa-single", root=dataset.root, out=tmp_path / "c.h5")
    data = load_dataset("mvsa-single", dataset.root)
    encoders = load_encoders(str(tiny_models[0]), str(tiny_models[1]), device="cpu")
    split_plan = make_plan(config, data, encoders)
    assert split_plan.attrs["device_type"] == "cpu"
    encoders.__dict__["pixels"] = PixelPipeline(processor=encoders.image_processor, split=False)
    assert make_plan(config, data, encoders).fingerprint != split_plan.fingerprint


# ---------------------------------------------------------------- resuming across devices


def test_a_partial_cache_started_on_another_device_type_is_refused_in_one_line(tiny_models, tmp_path, capsys):
    from fusion.cache.partial import PartialCache
    from fusion.extract.datasets.registry import load_dataset
    from fusion.extract.pipeline import ExtractConfig, make_plan

    dataset = write_mvsa(tmp_path / "data", n_per_class=2, dirty=False)
    out = tmp_path / "c.h5"
    encoders = load_encoders(str(tiny_models[0]), str(tiny_models[1]), device="cpu")
    plan = make_plan(ExtractConfig(dataset="mvsa-single", root=dataset.root, out=out),
                     load_dataset("mvsa-single", dataset.root), encoders)
    on_gpu = dataclasses.replace(plan, fingerprint="0" * 64, attrs={**plan.attrs, "device_type": "cuda"})
    PartialCache.open(out, plan=on_gpu).close()  # what a GPU run leaves when it is stopped
    capsys.readouterr()  # the weights' loading bars above
    assert main(extract_argv(dataset.root, out, tiny_models)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "started on cuda" in err and "--device cuda" in err


def test_a_complete_cache_made_on_another_device_type_says_so(tiny_models, tmp_path, capsys):
    import h5py
    from cache_fixtures import write_synthetic_cache

    dataset = write_mvsa(tmp_path / "data", n_per_class=2, dirty=False)
    out = write_synthetic_cache(tmp_path / "c.h5")
    with h5py.File(out, "a") as h5:
        h5.attrs["device_type"] = "cuda"
    assert main(extract_argv(dataset.root, out, tiny_models)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(on cuda; this run is on cpu)" in err


# ---------------------------------------------------------------- the writer thread


class RecordingPartial:
    def __init__(self, fail_at: int | None = None, delay: float = 0.0):
        self.rows, self.fail_at, self.delay, self.threads = [], fail_at, delay, set()

    def write_batch(self, rows, arrays, skipped):
        self.threads.add(threading.get_ident())
        if len(self.rows) == self.fail_at:
            raise OSError(28, "No space left on device")
        threading.Event().wait(self.delay)
        assert all(isinstance(value, np.ndarray) for value in arrays.values())  # copied to the host by the writer
        self.rows.append(list(rows))


def batch(i: int):
    return np.array([2 * i, 2 * i + 1]), {"text": torch.full((2, 3), float(i))}, {}


def test_the_writer_writes_every_batch_on_its_own_thread_even_when_the_loop_fails():
    partial, written = RecordingPartial(delay=0.01), []
    with pytest.raises(RuntimeError, match="encoder failed"):
        with BatchWriter(partial, written.append) as writer:
            for i in range(5):
                writer.put(*batch(i))
            raise RuntimeError("encoder failed")
    assert partial.rows == [[2 * i, 2 * i + 1] for i in range(5)] and written == [2] * 5
    assert threading.get_ident() not in partial.threads


def test_a_failed_write_surfaces_on_the_loop_and_never_blocks_it():
    partial = RecordingPartial(fail_at=1)
    with pytest.raises(OSError, match="No space left"):
        with BatchWriter(partial, depth=1) as writer:
            for i in range(50):  # far more than the queue holds: a dead writer must not leave put() blocked
                writer.put(*batch(i))
    assert partial.rows == [[0, 1]]
    partial = RecordingPartial(fail_at=2)
    with pytest.raises(OSError):  # the last batches fail: raised when the block exits
        with BatchWriter(partial) as writer:
            for i in range(3):
                writer.put(*batch(i))


# ---------------------------------------------------------------- decode workers and /dev/shm


def test_decode_workers_are_this_ranks_share_of_the_nodes_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert batches.default_decode_workers("cuda") == 15 and batches.default_decode_workers("cpu") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert batches.default_decode_workers("cuda") == 3 and batches.default_decode_workers("cpu") == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert batches.default_decode_workers("cuda") == 1


def test_workers_are_fitted_to_free_shared_memory_with_advice(monkeypatch):
    batch_bytes = 128 * 3 * 224 * 224  # a uint8 batch of 128 crops, 19 MB
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert batches.fit_to_shared_memory(14, batch_bytes, 64 << 30) == (14, None)
    fewer, note = batches.fit_to_shared_memory(14, batch_bytes, 256 << 20)
    assert 1 <= fewer < 14 and "--shm-size" in note and "256.0 MiB" in note
    assert 2 * fewer * batch_bytes < 256 << 20
    none, note = batches.fit_to_shared_memory(14, batch_bytes, 64 << 20)  # Docker's default
    assert none == 0 and "in this process" in note
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks share the folder
    assert batches.fit_to_shared_memory(14, batch_bytes, 1 << 30)[0] < batches.fit_to_shared_memory(
        14, batch_bytes, 4 << 30)[0]


def test_too_little_shared_memory_decodes_in_process_and_says_what_to_do(tiny_models, tmp_path, monkeypatch,
                                                                         capsys):
    from fusion.extract import pipeline

    dataset = write_mvsa(tmp_path / "data", n_per_class=2, dirty=False)
    monkeypatch.setattr(pipeline, "shared_memory_free", lambda: 1 << 17)  # not one batch of 32
    started = []

    def loader(*args, workers, **kwargs):
        started.append(workers)
        return batches.image_loader(*args, workers=workers, **kwargs)

    monkeypatch.setattr(pipeline, "image_loader", loader)
    argv = extract_argv(dataset.root, tmp_path / "c.h5", tiny_models)
    argv[argv.index("--workers") + 1] = "2"
    assert main(argv) == 0
    assert started == [0]
    err = capsys.readouterr().err
    assert "fusion: note: /dev/shm has 0.1 MiB free" in err and "--shm-size" in err


# ---------------------------------------------------------------- predict of an fp16 run on a CPU


def test_predict_runs_an_fp16_extracted_run_in_fp32_on_cpu_and_says_so(tiny_models, tmp_path, capsys):
    from cache_fixtures import write_synthetic_cache

    from fusion.device import run_encoder_precision
    from fusion.heads.checkpoint import save_run
    from fusion.heads.config import FitConfig
    from fusion.heads.runs import load_features
    from fusion.heads.train import train_head

    features, meta = load_features(write_synthetic_cache(tmp_path / "c.h5", (12, 4, 4), dt=32, di=24))
    meta = {**meta, "text_model": str(tiny_models[0]), "image_model": str(tiny_models[1]), "precision": "fp16",
            "max_length": 16, "device_type": "cuda"}
    run = save_run(tmp_path / "run", train_head(features, FitConfig(head="basic", epochs=1)), cache=meta)
    image = write_image(tmp_path / "post.jpg", 3)
    code = main(["predict", "--run", str(run), "--image", str(image), "--text", "not bad", "--device", "cpu",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and '"label"' in out
    assert "fusion: note:" in err and "fp16" in err and "fp32" in err
    assert run_encoder_precision("bf16", torch.device("cpu")) == ("bf16", None)


# ---------------------------------------------------------------- benchmarks/gpu_check.sh


def bare_python(folder: Path) -> Path:
    """A `python3` that is this interpreter with no site processing (-S): no .pth files, so no editable install of
    fusion, only the packages' folder on PYTHONPATH; as on a GPU machine that has the packages but not fusion."""
    folder.mkdir(parents=True, exist_ok=True)
    python = folder / "python3"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    return python


def packages_path() -> str:
    """This environment's package folders, as a plain path (without their .pth files)."""
    return os.pathsep.join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))


def run_gpu_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    python = bare_python(tmp_path / "bin")
    environment = {"PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
                   "PYTHONPATH": packages_path(), "TMPDIR": str(tmp_path), **env}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          cwd=tmp_path, env=environment, timeout=120)


def test_gpu_check_stops_with_its_own_message_without_a_gpu_after_its_shim_ran_fusion_help(tmp_path):
    bare = subprocess.run([str(bare_python(tmp_path / "bin")), "-c", "import fusion"], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": packages_path()})
    assert "No module named 'fusion'" in bare.stderr  # the packages are there, fusion is not installed
    done = run_gpu_check(tmp_path, CUDA_VISIBLE_DEVICES="")
    output = done.stdout + done.stderr
    assert done.returncode == 3, output  # its own code: not 127 (command not found), not a traceback
    assert "Traceback" not in output
    assert "fusion --help: ok" in done.stdout  # the shim made the repository importable as `fusion`
    assert f"fusion from {REPO}" in done.stdout  # this checkout, not an installed copy
    assert "no CUDA device" in done.stderr and "CUDA_VISIBLE_DEVICES=''" in done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("{") and '"stopped"' in last
    assert not list(tmp_path.glob("gpu-check-shim*")), "the shim folder outlived the script"


def test_gpu_check_without_python_says_so(tmp_path):
    done = run_gpu_check(tmp_path, PY=str(tmp_path / "no-such-python"))
    assert done.returncode == 2 and "no-such-python" in done.stderr and "PY=" in done.stderr


def test_gpu_check_takes_a_relative_python_path(tmp_path):
    """PY=bin/python3, relative to where it is started: still the same interpreter after the script's cd."""
    bare_python(tmp_path / "bin")
    done = run_gpu_check(tmp_path, PY="bin/python3", CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 3 and "fusion --help: ok" in done.stdout, done.stdout + done.stderr


# ---------------------------------------------------------------- gpu_check: the deadline, the partial results, serve


def test_a_step_still_running_at_the_deadline_is_stopped_reported_and_the_json_still_comes(tmp_path):
    from fusion.benchmarks.gpu_check import Steps

    partial = tmp_path / "partial.json"
    steps = Steps(time.time() + 2, partial)
    assert steps.run("quick", lambda: {"ok": 1}, needs_s=0) == {"ok": 1}
    assert json.loads(partial.read_text()) == {"quick": {"ok": 1}}
    assert steps.run("stuck", lambda: time.sleep(600), needs_s=0) is None  # stopped, not waited for
    assert steps.run("after", lambda: {"ran": True}) is None
    assert steps.results["stuck"]["error"].startswith("out of time: stopped at the check's deadline")
    assert steps.results["after"] == {"skipped": "under 20 s of the budget left"}
    assert json.loads(partial.read_text()) == steps.results
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left behind


def test_the_budget_counts_the_interpreters_start_up_and_the_scripts_deadline_wins(monkeypatch):
    from fusion.benchmarks import gpu_check

    probe = ("import time; time.sleep(0.3); from fusion.benchmarks.gpu_check import process_started; "
             "print(time.time() - process_started())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert float(done.stdout) >= 0.3  # the start is before the sleep, not when the budget is asked for
    monkeypatch.delenv("GPU_CHECK_DEADLINE", raising=False)
    assert gpu_check.check_deadline(100) == pytest.approx(gpu_check.process_started() + 100)
    monkeypatch.setenv("GPU_CHECK_DEADLINE", str(gpu_check.process_started() + 5))
    assert gpu_check.check_deadline(100) == pytest.approx(gpu_check.process_started() + 5)


def test_gpu_check_killed_at_its_limit_still_ends_with_a_json_line_of_the_steps_done(tmp_path):
    """A python that writes one finished step and then hangs: the shell kills it at LIMIT and prints the JSON line
    with that step."""
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    hanging = bin_folder / "python3"
    hanging.write_text('#!/bin/sh\ncase "$*" in\n  *fusion.benchmarks.gpu_check*)\n'
                       '    printf \'{"setup": {"ok": true}}\' > "$GPU_CHECK_PARTIAL"; exec sleep 300;;\n'
                       f'  *) exec "{sys.executable}" -S "$@";;\nesac\n')
    hanging.chmod(0o755)
    environment = {"PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
                   "PYTHONPATH": packages_path(), "TMPDIR": str(tmp_path), "LIMIT": "10"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          cwd=tmp_path, env=environment, timeout=120)
    assert done.returncode == 124, done.stdout + done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["gpu_check"] == "stopped" and "LIMIT=10" in last["reason"]
    assert last["steps"] == {"setup": {"ok": True}}


def test_the_serve_step_compares_sixteen_concurrent_answers_with_predict_on_the_cpu(tiny_models, tmp_path):
    from serve_fixtures import make_tiny_run

    from fusion.benchmarks.gpu_check import SERVE_CLIENTS, check_serve

    tiny = make_tiny_run(tmp_path, tiny_models)
    posts = [(tiny.images[i % len(tiny.images)], f"post {i}: {tiny.texts[i % len(tiny.texts)]}")
             for i in range(SERVE_CLIENTS)]
    result = check_serve(tiny.run, posts, tmp_path, "cpu")  # on a GPU machine: "cuda"
    assert result["device"] == "cpu" and result["statuses"] == [200] and result["answered_200"] == 16
    assert result["equal_within_tolerance"] is True and result["labels_agree"] == 16
    assert result["max_abs_diff_to_cpu_predict"] <= 1e-3  # the same device here: batching's padding at most


def test_the_serve_step_says_what_is_missing_for_it(monkeypatch, tmp_path):
    import importlib.util

    from fusion.benchmarks import gpu_check

    real = importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None if name == "uvicorn" else real(name))
    result = gpu_check.check_serve(tmp_path / "no-run", [], tmp_path, "cuda")
    assert "lacks uvicorn" in result["skipped"]


def test_the_precision_steps_fit_their_decode_workers_to_shared_memory(tiny_models, tmp_path, monkeypatch):
    from fusion.benchmarks.gpu_check import measure_precision
    from fusion.extract.pipeline import ExtractConfig

    dataset = write_mvsa(tmp_path / "data", n_per_class=2, dirty=False)
    monkeypatch.setattr(batches, "shared_memory_free", lambda: 1000)  # not one batch of crops: no workers
    config = ExtractConfig(dataset="mvsa-single", root=dataset.root, out=tmp_path / "cache.h5",
                           text_model=str(tiny_models[0]), image_model=str(tiny_models[1]), device="cpu",
                           batch_size=4, workers=None)
    result = measure_precision(config, "fp32")
    assert result["decode_workers"] == 0 and result["rows"] > 0
