"""The GPU machine check behind benchmarks/gpu_check.sh (which makes `fusion` importable and calls this).

    bash benchmarks/gpu_check.sh        # on the GPU machine; its last line is one JSON object
    .venv/bin/python -m fusion.benchmarks.gpu_check --device cpu --small-models --n 48 --batch-size 16 \
        --torchrun-n 24                 # a dry run without a GPU

Preflight (python, torch, CUDA, the packages, free /dev/shm), then on random models of the bert-base-uncased and
dinov2-small shapes (written here, no hub) and N synthetic MVSA-Single posts:
- fp32, bf16 and fp16 extraction. `loop_ratio` is the batch loop alone (first to last progress report: decoding,
  batches, forwards, writing) against the two encoders' pure forward over the same batches already on the GPU, same
  models and precision; `load_s` (dataset, models, plan) and `finalize_s` (the HDF5 merge) are reported apart.
  bf16 and fp16 also give their lowest cosine similarity to fp32;
- `--tokens` extraction (bf16, N/4 samples);
- `fusion predict` on the GPU, and on the CPU for a run extracted in fp16 (which runs in fp32 there and says so);
- a 2-rank torchrun extraction on this machine's GPU(s) at small N, compared with one process;
- the paper's grid (`fusion grid --device cuda`, 144 configurations) on the fp32 cache, if fit/grid have --device.
Every step reports its own failure instead of stopping the rest; steps that would pass the time budget are skipped.
The extraction is timed with extract_speed's measures, on common.py's synthetic encoders and posts. Only the standard
library and this package's light modules are imported before the preflight: it reports what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fusion.benchmarks.common import (OtherLoad, add_device, add_precisions, finish, new_parser, write_encoders,
                                      write_mvsa_single)

PACKAGES = ("torch", "transformers", "h5py", "numpy", "typer", "rich", "sklearn", "safetensors", "PIL", "filelock")
NO_GPU_EXIT, MISSING_EXIT = 3, 4


def stop(reason: str, code: int) -> None:
    print(f"gpu_check: {reason}", file=sys.stderr)
    print(json.dumps({"gpu_check": "stopped", "reason": reason}))
    sys.exit(code)


def preflight(device: str) -> dict:
    """Which python, torch and CUDA; stops (exit 3) where torch sees no GPU, (exit 4) where a package is missing."""
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        stop(f"{sys.executable} lacks {', '.join(missing)}; fusion needs {', '.join(PACKAGES)}", MISSING_EXIT)
    import torch

    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    info = {"python": f"{sys.executable} {sys.version.split()[0]}", "torch": torch.__version__,
            "cuda_build": torch.version.cuda, "cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "shm_free_gib": round(shm.f_bavail * shm.f_frsize / 2**30, 2) if shm else None}
    print("preflight: " + ", ".join(f"{key} {value}" for key, value in info.items()), flush=True)
    if device == "cpu":  # a dry run of the script itself on a machine without a GPU
        return info
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        stop(f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device (CUDA_VISIBLE_DEVICES="
             f"{'unset' if visible is None else repr(visible)}); this script measures a GPU machine: run it on one",
             NO_GPU_EXIT)
    info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
    return info


class Steps:
    """Runs named steps within a time budget; each one's result or error goes into `results`."""

    def __init__(self, budget_s: float):
        self.deadline, self.results = time.monotonic() + budget_s, {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, step, *, needs_s: float = 20.0):
        if self.left() < needs_s:
            self.results[name] = {"skipped": f"under {needs_s:.0f} s of the budget left"}
            return None
        started = time.perf_counter()
        try:
            value = step()
        except Exception as error:  # noqa: BLE001 - one step's failure is reported, the others still run
            self.results[name] = {"error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
            print(f"{name}: failed: {error}", flush=True)
            return None
        self.results[name] = value
        print(f"{name} ({time.perf_counter() - started:.1f} s): {json.dumps(value)}", flush=True)
        return value


# ------------------------------------------------------------------ extraction against the pure forward


def measure_precision(config, precision: str) -> dict:
    import torch

    from fusion.benchmarks.extract_speed import forward_seconds, prepared_batches, timed_extract
    from fusion.extract.batches import default_decode_workers
    from fusion.extract.encoders import load_encoders

    config = dataclasses.replace(config, precision=precision, out=config.out.with_name(f"cache-{precision}.h5"))
    encoders = load_encoders(config.text_model, config.image_model, device=config.device, precision=precision)
    prepared = prepared_batches(config, encoders, workers=max(1, os.cpu_count() - 1))
    forward_seconds(encoders, prepared[:2])  # kernels chosen and memory pooled before anything is timed
    forward = min(forward_seconds(encoders, prepared) for _ in range(2))
    pixels = encoders.pixels.describe()
    del prepared, encoders
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    run = timed_extract(config)
    rows = run["rows"]
    run.update(forward_s=forward, loop_ratio=forward / run["loop_s"], loop_samples_per_s=rows / run["loop_s"],
               forward_samples_per_s=rows / forward, decode_workers=default_decode_workers(config.device),
               pixels=pixels)
    return rounded(run)


def rounded(figures: dict) -> dict:
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in figures.items()}


# ------------------------------------------------------------------ the CLI: --tokens, predict, torchrun, grid


def cli(argv: list[str]) -> tuple[int, str, str]:
    """`fusion ARGV` in this process (no second start-up of torch): exit code, stdout, stderr."""
    from fusion.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def check_predict(cache: Path, root: Path, work: Path, device: str) -> dict:
    """A head fitted on `cache` (the fp16 one on a GPU), predicting on `device` and on the CPU."""
    code, _, err = cli(["fit", "--cache", str(cache), "--head", "basic", "--epochs", "2", "--out",
                        str(work / "run-fp16")])
    assert code == 0, err[-500:]
    posts = work / "posts.csv"
    posts.write_text("image,text\n" + "".join(f"{root}/data/{i}.jpg,post number {i} was great\n"
                                              for i in range(1, 17)))
    result = {}
    for device in dict.fromkeys((device, "cpu")):
        started = time.perf_counter()
        code, out, err = cli(["predict", "--run", str(work / "run-fp16"), "--csv", str(posts), "--json",
                              "--device", device])
        assert code == 0, err[-500:]
        labelled = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        result[device] = {"seconds": round(time.perf_counter() - started, 2), "posts": len(labelled),
                          "labelled": sum(1 for row in labelled if row["label"]), "note": err.strip()[-200:]}
    return result


def check_torchrun(config, work: Path, n: int) -> dict:
    import numpy as np

    from fusion.cache.reader import read_cache
    from fusion.extract.pipeline import extract

    single = dataclasses.replace(config, out=work / "one-process.h5", limit=n, precision="fp32")
    extract(single)
    argv = ["extract", "--dataset", "mvsa-single", "--root", str(config.root), "--out", str(work / "two-ranks.h5"),
            "--text-model", config.text_model, "--image-model", config.image_model, "--device", config.device,
            "--batch-size", str(config.batch_size), "--limit", str(n)]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "fusion.cli", *argv], capture_output=True, text=True, timeout=150)
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        return {"exit": done.returncode, "seconds": seconds, "stderr": done.stderr.strip()[-400:]}
    a, b = read_cache(single.out), read_cache(work / "two-ranks.h5")
    diff = max(float(np.abs(getattr(a.splits[s], m).astype(np.float32) - getattr(b.splits[s], m)).max(initial=0))
               for s in a.splits for m in ("text", "image"))
    return {"exit": 0, "seconds": seconds, "rows": sum(len(a.splits[s].id) for s in a.splits),
            "max_abs_diff_to_one_process": diff}


def grid_has_device_option() -> bool:
    import typer

    from fusion.cli import app

    command = typer.main.get_command(app).commands["grid"]
    return any("--device" in parameter.opts for parameter in command.params)


def check_grid(cache: Path, work: Path, seconds: float, device: str):
    if not grid_has_device_option():
        return "no --device option"
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "fusion.cli", "grid", "--cache", str(cache), "--out",
                               str(work / "grid"), "--device", device], capture_output=True, text=True,
                              timeout=seconds)
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": round(seconds), "configs_done": count_lines(work / "grid" / "results.jsonl")}
    if done.returncode != 0:
        return {"exit": done.returncode, "stderr": done.stderr.strip()[-400:]}
    rows = json.loads((work / "grid" / "results.json").read_text())["rows"]
    return {"seconds": round(time.perf_counter() - started, 1), "configs": len(rows)}


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


# ------------------------------------------------------------------ the run


def parse_args(argv: list[str] | None = None):
    parser = new_parser(__doc__)
    parser.add_argument("--n", type=int, default=int(os.environ.get("N", 4096)), help="posts extracted per precision")
    parser.add_argument("--batch-size", type=int, default=int(os.environ.get("BATCH", 128)))
    parser.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET", 270)),
                        help="seconds for everything after the preflight")
    parser.add_argument("--torchrun-n", type=int, default=256)
    add_device(parser, "cuda", help="cuda or cuda:N; cpu: a dry run of this script without a GPU")
    parser.add_argument("--small-models", action="store_true", help="small random encoders (a quick dry run)")
    add_precisions(parser, "fp32,bf16,fp16")
    return parser.parse_args(argv)


def run_all(args, info: dict, work: Path) -> dict:
    from fusion.benchmarks.extract_speed import min_cosine, timed_extract
    from fusion.extract.encoders import quiet_transformers
    from fusion.extract.pipeline import ExtractConfig

    quiet_transformers()
    steps = Steps(args.budget)
    models = write_encoders(work, small=args.small_models)
    root = write_mvsa_single(work / "data", args.n)
    config = ExtractConfig(dataset="mvsa-single", root=root, out=work / "cache.h5", text_model=str(models[0]),
                           image_model=str(models[1]), device=args.device, batch_size=args.batch_size,
                           workers=None)
    precisions = args.precisions
    for precision in precisions:
        steps.run(precision, lambda: measure_precision(config, precision), needs_s=40)
    base = work / f"cache-{precisions[0]}.h5"
    for precision in precisions[1:]:
        if base.exists() and (work / f"cache-{precision}.h5").exists():
            cosine = min_cosine(base, work / f"cache-{precision}.h5")
            steps.results[precision]["min_cosine_to_" + precisions[0]] = round(min(cosine.values()), 5)
    tokens = dataclasses.replace(config, tokens=True, precision="bf16", limit=args.n // 4, out=work / "tokens.h5")
    steps.run("tokens", lambda: rounded(timed_extract(tokens)))
    steps.run("predict", lambda: check_predict(work / f"cache-{precisions[-1]}.h5", root, work, args.device))
    steps.run("torchrun_2_ranks", lambda: check_torchrun(config, work, args.torchrun_n), needs_s=60)
    steps.run("grid", lambda: check_grid(base, work, max(10.0, steps.left() - 5), args.device))
    return {"preflight": info, "n": args.n, "batch_size": args.batch_size, **steps.results}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    info = preflight(args.device)
    load = OtherLoad()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as temp:
        result = run_all(args, info, Path(temp))
    return finish(result, other_cores=load.cores())


if __name__ == "__main__":
    main()
