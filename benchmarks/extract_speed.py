"""Extraction speed: `fusion extract` end to end against the encoders' pure forward, measured in one run.

    .venv/bin/python benchmarks/extract_speed.py                       # CPU: N=96, batch 16, a few minutes
    benchmarks/gpu_check.sh                                            # GPU: calls this with --device cuda ...

Random models of the exact bert-base-uncased and dinov2-small shapes (with a 30,522-entry WordPiece tokenizer and
dinov2-small's preprocessing: shortest edge 256, centre crop 224) are saved with save_pretrained and loaded through
the same path as real names; the dataset is N tweet-like texts and 640x480 JPEG photos in the MVSA-Single format.

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
import functools
import json
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine_load import OtherLoad  # benchmarks/machine_load.py, beside this script
from fusion.device import bf16_units  # noqa: E402
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fusion.cache.reader import read_cache  # noqa: E402
from fusion.extract.batches import image_loader, pad_token_ids  # noqa: E402
from fusion.extract.datasets.registry import load_dataset  # noqa: E402
from fusion.extract.encoders import image_embeddings, load_encoders, text_embeddings  # noqa: E402
from fusion.extract.pipeline import ExtractConfig, extract, shard_batches, tokenize  # noqa: E402

VOCAB_SIZE = 30522  # bert-base-uncased
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
COMMON = ("the a an is was are to of and in on for with my this that it so not no very really just love hate "
          "good great bad sad happy today day night game match team city food coffee phone music show movie new "
          "old best worst ever never time people work home weekend trip photo morning amazing awful lol omg rt "
          "can't don't i'm you we they he she what when why how here there now").split()
CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"
PHOTO_SIZE = (640, 480)


# ------------------------------------------------------------------ synthetic models and data


@functools.cache
def syllables() -> list[str]:
    return [c + v + e for c in CONSONANTS for v in VOWELS for e in ("", *CONSONANTS)]


def bert_vocab() -> list[str]:
    """Special tokens, characters, common words, syllable words and ##pieces, then [unusedN] up to 30,522,
    so WordPiece does the work it does on real tweets (common words whole, rare ones split)."""
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    pieces = syllables()
    words = COMMON + pieces + [a + b for a in pieces[:60] for b in pieces[:100]]
    vocab = list(dict.fromkeys(SPECIAL + chars + ["##" + c for c in chars] + words + ["##" + p for p in pieces]))
    vocab = vocab[:VOCAB_SIZE]
    return vocab + [f"[unused{i}]" for i in range(VOCAB_SIZE - len(vocab))]


def write_models(folder: Path) -> tuple[Path, Path]:
    """bert-base-uncased and dinov2-small shapes with random weights (written once per --workdir)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast, Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_bit import BitImageProcessor

    bert, dinov2 = folder / "bert-base-shape", folder / "dinov2-small-shape"
    if not (bert / "config.json").exists():
        torch.manual_seed(0)
        vocab = bert_vocab()
        BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True).save_pretrained(bert)
        BertModel(BertConfig()).save_pretrained(bert)
    if not (dinov2 / "config.json").exists():
        torch.manual_seed(1)
        Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                 image_size=518)).save_pretrained(dinov2)
        BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                          resample=3, image_mean=[0.485, 0.456, 0.406],
                          image_std=[0.229, 0.224, 0.225]).save_pretrained(dinov2)
    return bert, dinov2


def tweet(rng: np.random.Generator, pieces: list[str]) -> str:
    """6-40 words: mostly common words, some rare ones WordPiece must split, a hashtag, a mention, a link."""
    words = []
    for _ in range(int(rng.integers(6, 41))):
        roll = rng.random()
        if roll < 0.6:
            words.append(COMMON[int(rng.integers(len(COMMON)))])
        else:
            words.append("".join(pieces[int(i)] for i in rng.integers(0, len(pieces), int(rng.integers(2, 5)))))
    words.insert(int(rng.integers(len(words))), "#" + words[-1])
    if rng.random() < 0.3:
        words.append(f"@user{int(rng.integers(1000))} http://t.co/{int(rng.integers(1e9)):x}")
    return " ".join(words).capitalize() + "!"


def photo(rng: np.random.Generator) -> Image.Image:
    """A smooth random scene with fine noise: compresses and decodes like a photo, not like pure noise."""
    coarse = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize(PHOTO_SIZE, Image.BICUBIC), dtype=np.int16)
    noisy = image + rng.integers(-12, 13, image.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_pair(data: Path, seed: int, sample: int) -> None:
    rng = np.random.default_rng([seed, sample])  # per sample, so the files do not depend on how writing is split
    (data / f"{sample}.txt").write_text(tweet(rng, syllables()), encoding="utf-8")
    photo(rng).save(data / f"{sample}.jpg", "JPEG", quality=90)


def write_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """root/MVSA_Single with n labelled pairs whose text and image labels agree (none dropped by cleaning)."""
    folder = root / "MVSA_Single"
    if (folder / "labelResultAll.txt").exists():
        return folder
    (folder / "data").mkdir(parents=True, exist_ok=True)
    jobs = [(folder / "data", seed, sample) for sample in range(1, n + 1)]
    with multiprocessing.Pool(max(1, min(16, (os.cpu_count() or 1)))) as pool:
        pool.starmap(write_pair, jobs, chunksize=32)
    labels = ("negative", "neutral", "positive")
    lines = ["ID\ttext,image"] + [f"{sample}\t{labels[sample % 3]},{labels[sample % 3]}" for sample in range(1, n + 1)]
    (folder / "labelResultAll.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")  # last: marks it complete
    return folder


# ------------------------------------------------------------------ measurements


def extract_config(args, models: tuple[Path, Path], root: Path, out: Path, precision: str) -> ExtractConfig:
    extra = {} if args.workers is None else {"workers": args.workers}
    return ExtractConfig(dataset="mvsa-single", root=root, out=out, text_model=str(models[0]),
                         image_model=str(models[1]), device=args.device, precision=precision,
                         batch_size=args.batch_size, **extra)


def timed_extract(config: ExtractConfig) -> dict:
    """Seconds for the whole call, and for the batch loop alone (first to last progress report)."""
    stamps = []
    started = time.perf_counter()
    summary = extract(config, lambda done, total: stamps.append(time.perf_counter()))
    seconds = time.perf_counter() - started
    return {"rows": summary.rows_computed, "seconds": seconds, "loop_seconds": stamps[-1] - stamps[0],
            "out": config.out}


def prepared_batches(config: ExtractConfig, encoders, limit: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """The pipeline's own batches (same length-sorted composition), tokenised, decoded (in workers: preparing is not
    timed) and already on the device."""
    samples = load_dataset(config.dataset, config.root, seed=config.split_seed).samples
    token_ids = tokenize(encoders, samples, config.max_length)
    batches = shard_batches(token_ids, config.batch_size, rank=0, world_size=1)[:limit]
    loader = image_loader([s.image for s in samples], encoders.pixels, batches, workers=config.workers,
                          pin_memory=False)
    prepared = []
    for indices, pixels, skipped in loader:
        assert not skipped, skipped
        input_ids, mask = pad_token_ids([token_ids[i] for i in indices], encoders.tokenizer.pad_token_id,
                                        encoders.pad_multiple)
        prepared.append((input_ids.to(encoders.device), mask.to(encoders.device), encoders.model_pixels(pixels)))
    return prepared


def timed_forwards(encoders, batches) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for input_ids, mask, pixels in batches:
            text_embeddings(encoders, input_ids, mask)
            image_embeddings(encoders, pixels)
    if encoders.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def min_cosine(path_a: Path, path_b: Path) -> dict[str, float]:
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
    command = [sys.executable, __file__, "--rss-child", str(root), "--rss-out", str(out),
               "--workdir", str(models[0].parent), "--device", args.device, "--batch-size", str(args.batch_size),
               "--rss-precision", args.rss_precision]
    command += [] if args.workers is None else ["--workers", str(args.workers)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_child(args) -> None:
    """The peak over the whole run (usually set while the weights load), and the highest resident size seen at
    the batch loop's progress reports, which is where per-row growth would show."""
    models = write_models(Path(args.workdir))
    config = extract_config(args, models, Path(args.rss_child), Path(args.rss_out), args.rss_precision)
    in_loop = []
    extract(config, lambda done, total: in_loop.append(resident_mb()))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so this process would report the
    # benchmark's own peak (its models and batches), the same for N and 4N. The decode workers are forked from
    # here, so their ru_maxrss starts at this process's size: an upper bound only.
    peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"peak": peak_kb / 1024, "loop": max(in_loop), "workers": workers_kb / 1024}))


# ------------------------------------------------------------------ the run


def measure_precision(args, models, root: Path, work: Path, precision: str) -> dict:
    """Extraction and the pure forward alternate, `--repeats` times; the fastest of each counts (noise from other
    work on the machine only ever adds time)."""
    config = extract_config(args, models, root, work / f"cache-{precision}.h5", precision)
    encoders = load_encoders(config.text_model, config.image_model, device=config.device, precision=precision)
    batches = prepared_batches(config, encoders)
    timed_forwards(encoders, batches[:1])  # thread pools and kernels start before anything is timed
    runs, forwards = [], []
    for repeat in range(args.repeats):
        runs.append(timed_extract(dataclasses.replace(config, out=work / f"cache-{precision}-{repeat}.h5")))
        forwards.append(timed_forwards(encoders, batches))
    rows, forward = sum(len(batch[0]) for batch in batches), min(forwards)
    assert all(run["rows"] == rows for run in runs), (runs, rows)
    run = {"rows": rows, "seconds": min(r["seconds"] for r in runs), "forward_seconds": forward,
           "loop_seconds": min(r["loop_seconds"] for r in runs), "cache": runs[0]["out"]}
    run.update(ratio=forward / run["seconds"], loop_ratio=forward / run["loop_seconds"])
    print(f"{precision}: extract {rows} rows in {run['seconds']:.1f} s ({rows / run['seconds']:.2f} samples/s; "
          f"batch loop alone {run['loop_seconds']:.1f} s); pure forward {forward:.1f} s ({rows / forward:.2f} "
          f"samples/s); ratio {run['ratio']:.3f} (loop alone {run['loop_ratio']:.3f}); all runs (s): extract "
          f"{[round(r['seconds'], 1) for r in runs]}, forward {[round(f, 1) for f in forwards]}", flush=True)
    return run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96, help="samples in the timed dataset (the RSS check uses 4N)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, default=None, help="image-decoding workers [ExtractConfig's default]")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the fastest counts")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated; the first is the baseline")
    parser.add_argument("--rss-precision", default="bf16", help="precision of the two RSS runs")
    parser.add_argument("--skip-rss", action="store_true", help="leave out the N vs 4N memory check")
    parser.add_argument("--workdir", default=None, help="keep models and datasets here (reused by later runs)")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the weight-loading bars would bury the figures
    transformers.utils.logging.set_verbosity_error()
    args = parse_args(argv)
    if args.rss_child:
        return rss_child(args)
    with tempfile.TemporaryDirectory(prefix="extract-speed-") as temp:
        workdir = Path(args.workdir or temp)
        run_benchmark(args, workdir, Path(tempfile.mkdtemp(dir=temp)))


def run_benchmark(args, workdir: Path, work: Path) -> None:
    load = OtherLoad()
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"device {args.device}, CPU bf16 units: {bf16_units()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    models = write_models(workdir)
    root = write_dataset(workdir / f"data-{args.n}", args.n)
    precisions = args.precisions.split(",")
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
    print(f"other processes used {load.cores():.2f} cores on average during the run; "
          f"load average now {os.getloadavg()[0]:.2f}")
    print(json.dumps(result))


def rss_growth(args, models, workdir: Path, work: Path) -> float:
    small = peak_rss_mb(args, models, write_dataset(workdir / f"data-{args.n}", args.n), work / "rss-n.h5")
    large_root = write_dataset(workdir / f"data-{4 * args.n}", 4 * args.n, seed=1)
    large = peak_rss_mb(args, models, large_root, work / "rss-4n.h5")
    print(f"RSS ({args.rss_precision}), {args.n} vs {4 * args.n} samples: peak {small['peak']:.0f} vs "
          f"{large['peak']:.0f} MB; highest in the batch loop {small['loop']:.0f} vs {large['loop']:.0f} MB; "
          f"decode workers' peak {small['workers']:.0f} vs {large['workers']:.0f} MB", flush=True)
    return large["peak"] / small["peak"] - 1


if __name__ == "__main__":
    main()
