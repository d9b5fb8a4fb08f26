"""Extraction speed: `fusion extract` end to end against the encoders' pure forward, measured in one run.

    .venv/bin/python -m fusion.benchmarks.extract_speed              # CPU: N=96, batch 16, a few minutes
    .venv/bin/python -m fusion.benchmarks.extract_speed --n 16 --repeats 1 --precisions fp32 --skip-rss   # a look
    bash benchmarks/gpu_check.sh                                      # GPU: gpu_check times extraction the same way

Random models of the exact bert-base-uncased and dinov2-small shapes (common.py write_encoders: a 30,522-entry
WordPiece tokenizer and dinov2-small's preprocessing, shortest edge 256, centre crop 224) are saved with
save_pretrained and loaded through the same path as real names; the dataset is N tweet-like texts and 640x480 JPEG
photos in the MVSA-Single format (common.py write_mvsa_single).

- ratio_to_forward: extraction samples/s (the whole `extract()` call: dataset, model loading, decoding, batches,
  writing, finalize) over the samples/s of the two forwards alone on the same batches, already tokenised, decoded
  and on the device, same models, batch size and precision. The first precision listed (fp32) gives the headline.
  Each is timed `--repeats` times, alternating, and the fastest counts.
- bf16_speedup: extraction seconds in fp32 over bf16. bf16_min_cosine: the lowest per-row cosine similarity between
  the bf16 and fp32 caches, text and image. rss_growth_4x: peak RSS of a fresh extraction process on 4N samples over
  one on N, minus 1.
The last line printed is one JSON object with these four figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fusion.benchmarks.common import (OtherLoad, add_device, add_precisions, add_repeats, add_workdir, finish,
                                      memory_kb, new_parser, synchronize, write_encoders, write_mvsa_single)
from fusion.cache.reader import read_cache
from fusion.extract.batches import image_loader, pad_token_ids
from fusion.extract.datasets.registry import load_dataset
from fusion.extract.encoders import image_embeddings, load_encoders, quiet_transformers, text_embeddings
from fusion.extract.pipeline import ExtractConfig, extract, shard_batches, tokenize


# ------------------------------------------------------------------ measurements (gpu_check makes them too)


def extract_config(args, models: tuple[Path, Path], root: Path, out: Path, precision: str) -> ExtractConfig:
    extra = {} if args.workers is None else {"workers": args.workers}
    return ExtractConfig(dataset="mvsa-single", root=root, out=out, text_model=str(models[0]),
                         image_model=str(models[1]), device=args.device, precision=precision,
                         batch_size=args.batch_size, **extra)


def timed_extract(config: ExtractConfig) -> dict:
    """Rows computed and seconds of the whole call (total_s), split into what precedes the batch loop (load_s:
    dataset, models, plan), the loop (loop_s: first to last progress report) and the HDF5 merge after it."""
    stamps = []
    started = time.perf_counter()
    summary = extract(config, lambda done, total: stamps.append(time.perf_counter()))
    ended = time.perf_counter()
    return {"rows": summary.rows_computed, "total_s": ended - started, "load_s": stamps[0] - started,
            "loop_s": stamps[-1] - stamps[0], "finalize_s": ended - stamps[-1], "notes": summary.notes}


def prepared_batches(config: ExtractConfig, encoders, *, workers: int) -> list[tuple[torch.Tensor, ...]]:
    """The pipeline's own batches (same length-sorted composition), tokenised, decoded (in `workers`: preparing is
    not timed) and already on the device."""
    samples = load_dataset(config.dataset, config.root, seed=config.split_seed).samples
    token_ids = tokenize(encoders, samples, config.max_length)
    batches = shard_batches(token_ids, config.batch_size, rank=0, world_size=1)
    loader = image_loader([s.image for s in samples], encoders.pixels, batches, workers=workers,
                          pin_memory=encoders.device.type == "cuda")
    prepared = []
    for indices, pixels, skipped in loader:
        assert not skipped, skipped
        input_ids, mask = pad_token_ids([token_ids[i] for i in indices], encoders.tokenizer.pad_token_id,
                                        encoders.pad_multiple)
        prepared.append((input_ids.to(encoders.device), mask.to(encoders.device), encoders.model_pixels(pixels)))
    synchronize(encoders.device)
    return prepared


def forward_seconds(encoders, batches) -> float:
    """The two encoders' forwards alone over prepared batches."""
    synchronize(encoders.device)
    started = time.perf_counter()
    with torch.inference_mode():
        for input_ids, mask, pixels in batches:
            text_embeddings(encoders, input_ids, mask)
            image_embeddings(encoders, pixels)
    synchronize(encoders.device)
    return time.perf_counter() - started


def min_cosine(path_a: Path, path_b: Path) -> dict[str, float]:
    """The lowest per-row cosine similarity between two caches of the same rows, text and image."""
    a, b = read_cache(path_a), read_cache(path_b)
    result = {}
    for modality in ("text", "image"):
        x = np.concatenate([getattr(a.splits[s], modality) for s in a.splits]).astype(np.float64)
        y = np.concatenate([getattr(b.splits[s], modality) for s in b.splits]).astype(np.float64)
        cosine = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        result[modality] = float(cosine.min())
    return result


def peak_rss_mb(args, models: tuple[Path, Path], root: Path, out: Path) -> dict[str, float]:
    """Peak RSS of a fresh process running one extraction (workers are reported apart)."""
    command = [sys.executable, "-m", "fusion.benchmarks.extract_speed", "--rss-child", str(root), "--rss-out",
               str(out), "--workdir", str(models[0].parent), "--device", args.device, "--batch-size",
               str(args.batch_size), "--rss-precision", args.rss_precision]
    command += [] if args.workers is None else ["--workers", str(args.workers)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def rss_child(args) -> None:
    """The peak over the whole run (usually set while the weights load), and the highest resident size seen at
    the batch loop's progress reports, which is where per-row growth would show."""
    models = write_encoders(Path(args.workdir))
    config = extract_config(args, models, Path(args.rss_child), Path(args.rss_out), args.rss_precision)
    in_loop = []
    extract(config, lambda done, total: in_loop.append(memory_kb("VmRSS") / 1024))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so this process would report the
    # benchmark's own peak (its models and batches), the same for N and 4N. The decode workers are forked from
    # here, so their ru_maxrss starts at this process's size: an upper bound only.
    peak_kb = memory_kb("VmHWM")
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"peak": peak_kb / 1024, "loop": max(in_loop), "workers": workers_kb / 1024}))


# ------------------------------------------------------------------ the run


def measure_precision(args, models, root: Path, work: Path, precision: str) -> dict:
    """Extraction and the pure forward alternate, `--repeats` times; the fastest of each counts (noise from other
    work on the machine only ever adds time)."""
    config = extract_config(args, models, root, work / f"cache-{precision}.h5", precision)
    encoders = load_encoders(config.text_model, config.image_model, device=config.device, precision=precision)
    batches = prepared_batches(config, encoders, workers=config.workers)
    forward_seconds(encoders, batches[:1])  # thread pools and kernels start before anything is timed
    runs, forwards = [], []
    for repeat in range(args.repeats):
        runs.append(timed_extract(dataclasses.replace(config, out=work / f"cache-{precision}-{repeat}.h5")))
        forwards.append(forward_seconds(encoders, batches))
    rows, forward = sum(len(batch[0]) for batch in batches), min(forwards)
    assert all(run["rows"] == rows for run in runs), (runs, rows)
    run = {"rows": rows, "seconds": min(r["total_s"] for r in runs), "forward_seconds": forward,
           "loop_seconds": min(r["loop_s"] for r in runs), "cache": work / f"cache-{precision}-0.h5"}
    run.update(ratio=forward / run["seconds"], loop_ratio=forward / run["loop_seconds"])
    print(f"{precision}: extract {rows} rows in {run['seconds']:.1f} s ({rows / run['seconds']:.2f} samples/s; "
          f"batch loop alone {run['loop_seconds']:.1f} s); pure forward {forward:.1f} s ({rows / forward:.2f} "
          f"samples/s); ratio {run['ratio']:.3f} (loop alone {run['loop_ratio']:.3f}); all runs (s): extract "
          f"{[round(r['total_s'], 1) for r in runs]}, forward {[round(f, 1) for f in forwards]}", flush=True)
    return run


def parse_args(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--n", type=int, default=96, help="samples in the timed dataset (the RSS check uses 4N)")
    parser.add_argument("--batch-size", type=int, default=16)
    add_device(parser, "cpu")
    parser.add_argument("--workers", type=int, default=None, help="image-decoding workers [ExtractConfig's default]")
    add_repeats(parser, 2, help="timed runs of each; the fastest counts")
    add_precisions(parser, "fp32,bf16")
    parser.add_argument("--rss-precision", default="bf16", help="precision of the two RSS runs")
    parser.add_argument("--skip-rss", action="store_true", help="leave out the N vs 4N memory check")
    add_workdir(parser, help="keep models and datasets here (reused by later runs) [a temporary folder]")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    quiet_transformers()  # the weight-loading bars would bury the figures
    args = parse_args(argv)
    if args.rss_child:
        return rss_child(args)
    with tempfile.TemporaryDirectory(prefix="extract-speed-") as temp:
        workdir = Path(args.workdir or temp)
        return run_benchmark(args, workdir, Path(tempfile.mkdtemp(dir=temp)))


def run_benchmark(args, workdir: Path, work: Path) -> dict:
    load = OtherLoad()
    print(f"device {args.device}; load average {os.getloadavg()[0]:.2f}", flush=True)
    models = write_encoders(workdir)
    root = write_mvsa_single(workdir / f"data-{args.n}", args.n)
    precisions = args.precisions
    runs = {p: measure_precision(args, models, root, work, p) for p in precisions}
    base = runs[precisions[0]]
    result = {"ratio_to_forward": round(base["ratio"], 3)}
    if "bf16" in runs and "fp32" in runs:
        fp32, bf16 = runs["fp32"], runs["bf16"]
        cosine = min_cosine(fp32["cache"], bf16["cache"])
        print(f"bf16 vs fp32: extraction {fp32['seconds'] / bf16['seconds']:.2f}x, pure forward "
              f"{fp32['forward_seconds'] / bf16['forward_seconds']:.2f}x; min cosine text {cosine['text']:.5f} "
              f"image {cosine['image']:.5f}", flush=True)
        result.update(bf16_speedup=round(fp32["seconds"] / bf16["seconds"], 3),
                      bf16_min_cosine=round(min(cosine.values()), 5))
    if not args.skip_rss:
        result["rss_growth_4x"] = round(rss_growth(args, models, workdir, work), 4)
    return finish(result, other_cores=load.cores())


def rss_growth(args, models, workdir: Path, work: Path) -> float:
    small = peak_rss_mb(args, models, write_mvsa_single(workdir / f"data-{args.n}", args.n), work / "rss-n.h5")
    large_root = write_mvsa_single(workdir / f"data-{4 * args.n}", 4 * args.n, seed=1)
    large = peak_rss_mb(args, models, large_root, work / "rss-4n.h5")
    print(f"RSS ({args.rss_precision}), {args.n} vs {4 * args.n} samples: peak {small['peak']:.0f} vs "
          f"{large['peak']:.0f} MB; highest in the batch loop {small['loop']:.0f} vs {large['loop']:.0f} MB; "
          f"decode workers' peak {small['workers']:.0f} vs {large['workers']:.0f} MB", flush=True)
    return large["peak"] / small["peak"] - 1


if __name__ == "__main__":
    main()
