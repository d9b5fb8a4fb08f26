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
- the paper's grid (`fusion grid --device cuda`, 144 configurations) on the fp32 cache, if fit/grid have --device;
- `fusion serve --device cuda` on loopback: 16 concurrent posts, each answer equal to `predict` on the CPU within
  bf16's tolerance (SERVE_TOLERANCE). It needs fastapi, uvicorn, python-multipart and httpx (the `serve` extra), and
  says so where they are missing.
Every step runs inside the step runner and reports its own failure instead of stopping the rest. The time budget is
counted from the interpreter's start (from the shell script's, GPU_CHECK_DEADLINE, when it ran it); a step that
would start with too little left is skipped, and one still running at the deadline is stopped (SIGALRM) and
reported out of time, so the JSON line always comes. After each step the results so far are written to
GPU_CHECK_PARTIAL, which the shell prints if the interpreter itself had to be killed.
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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fusion.benchmarks.common import (OtherLoad, add_device, add_precisions, finish, new_parser, write_encoders,
                                      write_mvsa_single)

PACKAGES = ("torch", "transformers", "h5py", "numpy", "typer", "rich", "sklearn", "safetensors", "PIL", "filelock")
SERVE_PACKAGES = ("fastapi", "uvicorn", "multipart", "httpx")
NO_GPU_EXIT, MISSING_EXIT = 3, 4
SERVE_CLIENTS = 16
# Probabilities from fp16 or bf16 encoders on a GPU against fp32 on the CPU: a few units of bf16's 2^-8 rounding.
SERVE_TOLERANCE = 0.02


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


class OutOfTime(Exception):
    """The check's deadline passed while a step was running."""


def process_started() -> float:
    """When this interpreter started (seconds since the epoch, from /proc), so its own start-up, importing torch
    included, counts against the budget; now where /proc cannot tell."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def check_deadline(budget_s: float) -> float:
    """The moment (seconds since the epoch) everything must be done by: `budget_s` after this interpreter started,
    or the shell script's GPU_CHECK_DEADLINE (its own start plus its LIMIT, less the time to finish), if earlier."""
    deadline = process_started() + budget_s
    given = os.environ.get("GPU_CHECK_DEADLINE")
    return min(deadline, float(given)) if given else deadline


@contextlib.contextmanager
def alarm_at(deadline: float):
    """Raises OutOfTime in the main thread at `deadline` (between two Python bytecodes: a GPU kernel in progress
    finishes first). Subprocesses started inside are killed by subprocess.run when it is interrupted."""

    def out_of_time(_signal, _frame):
        raise OutOfTime()

    previous = signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, deadline - time.time()))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Steps:
    """Runs named steps until a deadline; each one's result or error goes into `results`, which are written to
    `partial` (a JSON object) after every step."""

    def __init__(self, deadline: float, partial: Path | None = None):
        self.deadline, self.partial, self.results = deadline, partial, {}

    def left(self) -> float:
        return self.deadline - time.time()

    def run(self, name: str, step, *, needs_s: float = 20.0):
        if self.left() < needs_s:
            self._record(name, {"skipped": f"under {needs_s:.0f} s of the budget left"})
            return None
        started = time.perf_counter()
        try:
            with alarm_at(self.deadline):
                value = step()
        except OutOfTime:
            self._record(name, {"error": f"out of time: stopped at the check's deadline after "
                                         f"{time.perf_counter() - started:.0f} s"})
            print(f"{name}: out of time", flush=True)
            return None
        except Exception as error:  # noqa: BLE001 - one step's failure is reported, the others still run
            self._record(name, {"error": f"{type(error).__name__}: {str(error).strip()[:300]}"})
            print(f"{name}: failed: {error}", flush=True)
            return None
        self._record(name, value)
        print(f"{name} ({time.perf_counter() - started:.1f} s): {json.dumps(value)}", flush=True)
        return value

    def _record(self, name: str, value) -> None:
        self.results[name] = value
        if self.partial is not None:
            from fusion.atomic import write_text_atomic

            write_text_atomic(self.partial, json.dumps(self.results))


# ------------------------------------------------------------------ extraction against the pure forward


def measure_precision(config, precision: str) -> dict:
    import torch

    from fusion.benchmarks.extract_speed import forward_seconds, prepared_batches, timed_extract
    from fusion.extract.batches import fitted_workers, shared_memory_free
    from fusion.extract.encoders import load_encoders

    config = dataclasses.replace(config, precision=precision, out=config.out.with_name(f"cache-{precision}.h5"))
    encoders = load_encoders(config.text_model, config.image_model, device=config.device, precision=precision)
    batch_bytes = config.batch_size * encoders.pixels.bytes_per_image(encoders.image_size)
    workers, _ = fitted_workers(None, encoders.device.type, batch_bytes, shared_memory_free())  # as extract fits them
    prepared = prepared_batches(config, encoders, workers=workers)
    forward_seconds(encoders, prepared[:2])  # kernels chosen and memory pooled before anything is timed
    forward = min(forward_seconds(encoders, prepared) for _ in range(2))
    pixels = encoders.pixels.describe()
    del prepared, encoders
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    run = timed_extract(config)
    rows = run["rows"]
    run.update(forward_s=forward, loop_ratio=forward / run["loop_s"], loop_samples_per_s=rows / run["loop_s"],
               forward_samples_per_s=rows / forward, decode_workers=workers, pixels=pixels)
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


def fitted_run(cache: Path, work: Path) -> Path:
    """A basic head fitted on `cache` (the fp16 one on a GPU), once: what predict and serve are checked with."""
    run = work / "run-fp16"
    if not (run / "config.json").exists():
        code, _, err = cli(["fit", "--cache", str(cache), "--head", "basic", "--epochs", "2", "--out", str(run)])
        assert code == 0, err[-500:]
    return run


def check_posts(root: Path) -> list[tuple[Path, str]]:
    return [(root / "data" / f"{i}.jpg", f"post number {i} was great") for i in range(1, SERVE_CLIENTS + 1)]


def check_predict(cache: Path, root: Path, work: Path, device: str) -> dict:
    """A head fitted on `cache` (the fp16 one on a GPU), predicting on `device` and on the CPU."""
    run = fitted_run(cache, work)
    posts = work / "posts.csv"
    posts.write_text("image,text\n" + "".join(f"{image},{text}\n" for image, text in check_posts(root)))
    result = {}
    for device in dict.fromkeys((device, "cpu")):
        started = time.perf_counter()
        code, out, err = cli(["predict", "--run", str(run), "--csv", str(posts), "--json", "--device", device])
        assert code == 0, err[-500:]
        labelled = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        result[device] = {"seconds": round(time.perf_counter() - started, 2), "posts": len(labelled),
                          "labelled": sum(1 for row in labelled if row["label"]), "note": err.strip()[-200:]}
    return result


def check_serve(run: Path, posts: list[tuple[Path, str]], work: Path, device: str) -> dict:
    """`fusion serve --device DEVICE` (the command, in a child process) on loopback; len(posts) concurrent posts,
    each answer against `predict` of the same post on the CPU (fp32 encoders), within SERVE_TOLERANCE."""
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return {"skipped": f"{sys.executable} lacks {', '.join(missing)} (the serve extra: fastapi, uvicorn, "
                           "python-multipart, httpx); put them on PYTHONPATH to check serve"}
    import asyncio

    import httpx

    from fusion.app.predictor import Predictor
    from fusion.benchmarks.serve_speed import free_port, start_server
    from fusion.labels import LABELS

    reference = Predictor.load(run, device="cpu").predict([image for image, _ in posts], [t for _, t in posts])

    async def all_at_once(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=len(posts))) as client:
            return await asyncio.gather(*(client.post(f"{url}/predict", data={"text": text},
                                                      files={"image": (image.name, image.read_bytes())})
                                          for image, text in posts))

    port = free_port()
    try:
        server = start_server(run, port, work / "serve.log", None, ("--device", device))
    except SystemExit as error:  # the benchmarks' way of stopping; here one step's failure
        raise RuntimeError(str(error)[-400:]) from None
    url = f"http://127.0.0.1:{port}"
    try:
        responses = asyncio.run(all_at_once(url))
        ready = httpx.get(f"{url}/ready", timeout=30).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    answered = [response.json() for response in responses if response.status_code == 200]
    differences = [abs(answer["probabilities"][name] - expected["probabilities"][name])
                   for answer, expected in zip(answered, reference) for name in LABELS]
    worst = max(differences, default=float("nan"))
    return {"device": ready["device"], "precision": ready["precision"], "posts": len(posts),
            "answered_200": len(answered), "statuses": sorted({response.status_code for response in responses}),
            "batches_run": ready["batches_run"], "max_abs_diff_to_cpu_predict": round(worst, 5),
            "labels_agree": sum(a["label"] == e["label"] for a, e in zip(answered, reference)),
            "equal_within_tolerance": len(answered) == len(posts) and worst <= SERVE_TOLERANCE,
            "tolerance": SERVE_TOLERANCE}


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
    parser.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET", 280)),
                        help="seconds for everything, counted from this interpreter's start (GPU_CHECK_DEADLINE, "
                             "set by gpu_check.sh, ends it earlier)")
    parser.add_argument("--torchrun-n", type=int, default=256)
    add_device(parser, "cuda", help="cuda or cuda:N; cpu: a dry run of this script without a GPU")
    parser.add_argument("--small-models", action="store_true", help="small random encoders (a quick dry run)")
    add_precisions(parser, "fp32,bf16,fp16")
    return parser.parse_args(argv)


def lowest_cosines(work: Path, precisions: list[str]) -> dict:
    """Each precision's lowest per-row cosine similarity to the first's cache (text and image together)."""
    from fusion.benchmarks.extract_speed import min_cosine

    base, result = work / f"cache-{precisions[0]}.h5", {}
    for precision in precisions[1:]:
        other = work / f"cache-{precision}.h5"
        if base.exists() and other.exists():
            result[f"{precision}_to_{precisions[0]}"] = round(min(min_cosine(base, other).values()), 5)
    return result


def run_all(args, info: dict, work: Path, steps: Steps) -> dict:
    from fusion.benchmarks.extract_speed import timed_extract
    from fusion.extract.encoders import quiet_transformers
    from fusion.extract.pipeline import ExtractConfig

    quiet_transformers()
    made = steps.run("setup", lambda: {"models": [str(path) for path in write_encoders(work, small=args.small_models)],
                                       "root": str(write_mvsa_single(work / "data", args.n))}, needs_s=30)
    if made is None:
        return {"preflight": info, "n": args.n, "batch_size": args.batch_size, **steps.results}
    root = Path(made["root"])
    config = ExtractConfig(dataset="mvsa-single", root=root, out=work / "cache.h5", text_model=made["models"][0],
                           image_model=made["models"][1], device=args.device, batch_size=args.batch_size,
                           workers=None)
    precisions = args.precisions
    for precision in precisions:
        steps.run(precision, lambda: measure_precision(config, precision), needs_s=40)
    steps.run("min_cosine", lambda: lowest_cosines(work, precisions), needs_s=5)
    tokens = dataclasses.replace(config, tokens=True, precision="bf16", limit=args.n // 4, out=work / "tokens.h5")
    steps.run("tokens", lambda: rounded(timed_extract(tokens)))
    last = work / f"cache-{precisions[-1]}.h5"
    steps.run("predict", lambda: check_predict(last, root, work, args.device))
    steps.run("serve", lambda: check_serve(fitted_run(last, work), check_posts(root), work, args.device), needs_s=40)
    steps.run("torchrun_2_ranks", lambda: check_torchrun(config, work, args.torchrun_n), needs_s=60)
    steps.run("grid", lambda: check_grid(work / f"cache-{precisions[0]}.h5", work, max(10.0, steps.left() - 5),
                                         args.device))
    return {"preflight": info, "n": args.n, "batch_size": args.batch_size, **steps.results}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    deadline = check_deadline(args.budget)
    info = preflight(args.device)
    load = OtherLoad()
    partial = os.environ.get("GPU_CHECK_PARTIAL")
    steps = Steps(deadline, Path(partial) if partial else None)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as temp:
        result = run_all(args, info, Path(temp), steps)
    return finish(result, other_cores=load.cores())


if __name__ == "__main__":
    main()
