"""What streaming a token cache costs and saves: one dual_attn epoch with the token sequences in memory against one
that reads each minibatch's rows from the cache file, measured in one run.

    .venv/bin/python -m fusion.benchmarks.token_stream [--workdir DIR] [--train 2000] [--threads N] [--repeats 3]
    .venv/bin/python -m fusion.benchmarks.token_stream --cold       # its reads from the disk, not the page cache

The cache is synthetic but has the real shapes and is written through the real PartialCache + finalize path: text
tokens 128 x 768 (bert-base-uncased, max_length 128), image tokens 257 x 384 (dinov2-small at 224 px: CLS + 16 x 16
patches), float16, one row per HDF5 chunk with fletcher32; `--train` rows plus `--val` and `--test` (by default
2,000 + 250 + 250 rows, a ~1 GB file). It is written once into `--workdir` (and reused by later runs given the same
folder; without one, into a temporary folder removed at the end). A tiny cache of the same shapes is written too.

Each mode runs `--repeats` times, alternating (in-memory, streamed, in-memory, ...), every run in a FRESH process,
so its peak memory is its own (/proc/self/status VmHWM and VmRSS, not ru_maxrss, which Linux carries across fork and
exec):
- in-memory: load_features(tokens=True, stream=False) (the sequences read whole into float32 tensors), then
  train_head(FitConfig(head="dual_attn", epochs=1, batch_size=256)).
- streamed: load_features(tokens=True, stream=True) (TokenRows + StreamedSplit, with its read-ahead thread), then
  the same train_head.
Each process first trains one epoch on the tiny cache (thread pools, kernels, allocator caches), then records its
VmRSS, resets its peak (writing 5 to /proc/self/clear_refs) and measures: seconds to load; seconds of the epoch
(FitResult.seconds: the training pass plus the validation pass, as in benchmarks/fit_speed.py) with the process's
user and system CPU seconds and minor page faults over it; peak RSS growth over the RSS before loading. In the
streamed process TokenRows.rows and StreamedSplit.rows are wrapped to time the reads (HDF5 + finiteness checks;
+ the float32 conversion) done on the read-ahead thread, in wall and in that thread's CPU seconds, and the training
thread's waits for its next minibatch are timed: the wait is the part of the reading that the read-ahead did not
hide. Of each mode the run with the fastest epoch is reported (other processes only ever add time), with the
fastest load and the largest peak growth among its runs.

Page cache: the share of the cache file resident in the page cache is measured (mincore) before each run. A file
just written or read is usually all there, so reads come from memory, not the disk; `--cold` drops the file's pages
(posix_fadvise DONTNEED, no root needed) before every run.
The last line printed is one JSON object: stream_epoch_ratio (streamed / in-memory epoch seconds),
stream_peak_rss_mb and memory_peak_rss_mb (peak RSS growth of each, MiB), token_float32_mb (the token arrays as
float32 tensors, MiB), stream_load_ratio, stream_wait_fraction (the training thread's waits / the streamed epoch),
page_cached_min (the lowest resident share before a run of each mode), threads and repeats.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fusion.benchmarks.common import (IMAGE_DIM, PATCHES, TEXT_DIM, TEXT_LENGTH, OtherLoad, add_repeats, add_threads,
                                      add_workdir, finish, memory_kb, new_parser, use_threads)

WRITE_BATCH = 128  # rows per partial batch file while writing the cache
CONFIG = {"head": "dual_attn", "epochs": 1, "batch_size": 256}


# ------------------------------------------------------------------ the cache


def write_token_cache(path: Path, counts: tuple[int, int, int], seed: int = 0) -> Path:
    """A complete --tokens cache at `path` of the real shapes (reused when one with the same settings is there).
    Rows are generated a batch at a time (from a generator seeded by the batch's first row, so an interrupted write
    resumes to the same file) and go through PartialCache + finalize like `fusion extract --tokens`."""
    from fusion.cache.partial import PartialCache, Plan
    from fusion.cache.reader import is_complete_cache
    from fusion.cache.writer import finalize
    from fusion.labels import LABELS, SPLITS

    fingerprint = f"token-stream-{seed}-{'-'.join(map(str, counts))}-{TEXT_LENGTH}x{TEXT_DIM}-{PATCHES}x{IMAGE_DIM}"
    if is_complete_cache(path, fingerprint):
        return path
    rng = np.random.default_rng(seed)
    labels = [int(label) for count in counts for label in rng.permutation(np.arange(count) % len(LABELS))]
    attrs = {"dataset": "synthetic", "text_model": "bert-base-uncased-shape", "image_model": "dinov2-small-shape",
             "text_pooling": "cls", "image_pooling": "cls_layernorm", "max_length": TEXT_LENGTH, "image_size": 224,
             "split_seed": seed, "precision": "fp32", "tokens": True, "text_dim": TEXT_DIM, "image_dim": IMAGE_DIM,
             "text_model_revision": None}
    plan = Plan(fingerprint=fingerprint, attrs=attrs, labels=labels,
                ids=[f"{split}-{n:05d}" for split, count in zip(SPLITS, counts) for n in range(count)],
                splits=[split for split, count in zip(SPLITS, counts) for _ in range(count)])
    path.unlink(missing_ok=True)
    with PartialCache.open(path, plan=plan) as partial:
        pending = partial.pending()
        for start in range(0, len(pending), WRITE_BATCH):
            batch = pending[start:start + WRITE_BATCH]
            partial.write_batch(batch, synthetic_rows(batch, seed), {})
    return finalize([partial.directory], path)


def synthetic_rows(batch: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Unit-normal tokens; texts of tweet-like lengths (8..128 tokens, row 0 of the cache exactly 128, so the stored
    length is 128), zero past their end; token 0 is the pooled vector."""
    rng = np.random.default_rng([seed, int(batch[0])])
    lengths = rng.integers(8, TEXT_LENGTH + 1, size=len(batch))
    lengths[batch == 0] = TEXT_LENGTH
    mask = np.arange(TEXT_LENGTH)[None, :] < lengths[:, None]
    text = rng.standard_normal((len(batch), TEXT_LENGTH, TEXT_DIM), dtype=np.float32)
    text *= mask[..., None]
    image = rng.standard_normal((len(batch), PATCHES, IMAGE_DIM), dtype=np.float32)
    return {"text": text[:, 0].astype(np.float16), "image": image[:, 0].astype(np.float16),
            "text_tokens": text.astype(np.float16), "text_mask": mask, "image_tokens": image.astype(np.float16)}


def token_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the token sequences as float32 tensors, as float16 in the file), masks left out."""
    from fusion.cache.reader import TokenRows

    with TokenRows(path) as reader:
        values = sum(int(np.prod(shape)) for split in reader.shapes.values() for name, shape in split.items()
                     if name != "text_mask")
    return 4 * values, 2 * values


# ------------------------------------------------------------------ page cache


def cached_fraction(path: Path) -> float | None:
    """Share of the file's pages resident in the page cache (mincore on a read-only mapping; None if unavailable).
    Mapping a file reads nothing: only what is already cached counts."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                                  ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        size = path.stat().st_size
        page = mmap.PAGESIZE
        with open(path, "rb") as handle:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + page - 1) // page
            vector = ctypes.create_string_buffer(pages)
            if libc.mincore(address, size, vector) != 0:
                return None
            return float(np.frombuffer(vector.raw, dtype=np.uint8)[:pages].__and__(1).mean())
        finally:
            libc.munmap(address, size)
    except (OSError, AttributeError):
        return None


def drop_page_cache(path: Path) -> None:
    """Asks the kernel to evict the file's clean pages (works without root; dirty pages would stay)."""
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


# ------------------------------------------------------------------ the measured process


def reset_peak() -> bool:
    """VmHWM back to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> tuple[float, float, int]:
    """(user, system) CPU seconds of this process, all threads, and its minor page faults (each one a fresh page
    the kernel zeroes: the system time of large new tensors)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


class ReadProbe:
    """Times the streamed reads: TokenRows.rows (HDF5 read + finiteness check) and StreamedSplit.rows (that + the
    float32 conversion), both on the read-ahead thread, and the training thread's waits for its next minibatch."""

    def __init__(self):
        from fusion.cache.reader import TokenRows
        from fusion.heads.streamed import StreamedSplit

        self.lock = threading.Lock()
        self.totals = dict.fromkeys(("read_s", "read_cpu_s", "rows_s", "rows_cpu_s", "wait_s", "rows", "batches"),
                                    0.0)
        self._wrap(TokenRows, "rows", "read")
        self._wrap(StreamedSplit, "rows", "rows")
        original = StreamedSplit.batches
        probe = self

        def batches(split, selections):
            inner = original(split, selections)
            while True:
                started = time.perf_counter()
                batch = next(inner, None)
                probe.add("wait_s", time.perf_counter() - started)
                if batch is None:
                    return
                probe.add("batches", 1)
                probe.add("rows", len(batch))
                yield batch

        StreamedSplit.batches = batches

    def _wrap(self, cls, name: str, key: str) -> None:
        original, probe = getattr(cls, name), self

        def timed(*args, **kwargs):
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                probe.add(key + "_s", time.perf_counter() - started)
                probe.add(key + "_cpu_s", time.thread_time() - cpu)

        setattr(cls, name, timed)

    def add(self, key: str, value: float) -> None:
        with self.lock:
            self.totals[key] += value

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.totals)

    def reset(self) -> None:
        with self.lock:
            self.totals = dict.fromkeys(self.totals, 0.0)


def child(args) -> None:
    """One mode in this (fresh) process: a warm-up epoch on the tiny cache, then the measured load and epoch."""
    import torch

    from fusion.heads.config import FitConfig
    from fusion.heads.runs import load_features
    from fusion.heads.train import train_head

    use_threads(args.threads)
    stream = args.child == "stream"
    probe = ReadProbe() if stream else None
    features, _ = load_features(args.warm, tokens=True, stream=stream)
    train_head(features, FitConfig(**CONFIG))
    del features
    if probe:
        probe.reset()
    before_kb = memory_kb("VmRSS")
    peak_reset = reset_peak()
    started = time.perf_counter()
    features, _ = load_features(args.cache, tokens=True, stream=stream)
    load_s = time.perf_counter() - started
    loaded_kb = memory_kb("VmRSS")
    at_epoch_end = {}

    def on_epoch(epoch, index, metrics):
        at_epoch_end.update(seconds=time.perf_counter() - started, cpu=cpu_seconds(), reads=probe.snapshot() if probe
                            else None)

    started, cpu = time.perf_counter(), cpu_seconds()
    result = train_head(features, FitConfig(**CONFIG), on_epoch)
    train_head_s = time.perf_counter() - started
    peak_kb = memory_kb("VmHWM")
    print(json.dumps({"mode": args.child, "threads": torch.get_num_threads(), "load_s": load_s,
                      "epoch_s": result.seconds, "train_head_s": train_head_s, "epoch_end_s": at_epoch_end["seconds"],
                      "epoch_user_s": at_epoch_end["cpu"][0] - cpu[0], "epoch_sys_s": at_epoch_end["cpu"][1] - cpu[1],
                      "epoch_faults": at_epoch_end["cpu"][2] - cpu[2],
                      "before_mb": before_kb / 1024, "loaded_mb": loaded_kb / 1024, "peak_mb": peak_kb / 1024,
                      "peak_reset": peak_reset, "reads": at_epoch_end["reads"],
                      "rows": {name: len(split) for name, split in features.items()}}))


# ------------------------------------------------------------------ the run


def run_child(args, mode: str, cache: Path, warm: Path) -> dict:
    command = [sys.executable, "-m", "fusion.benchmarks.token_stream", "--child", mode, "--cache", str(cache),
               "--warm", str(warm)]
    command += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"the {mode} process failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = new_parser(__doc__)
    parser.add_argument("--train", type=int, default=2000, help="training rows")
    parser.add_argument("--val", type=int, default=250, help="validation rows")
    parser.add_argument("--test", type=int, default=250, help="test rows")
    add_threads(parser, None, help="torch threads in both runs [torch's default]")
    add_repeats(parser, 3, help="runs of each mode, alternating; the fastest counts")
    parser.add_argument("--cold", action="store_true", help="drop the cache file from the page cache before each run")
    add_workdir(parser, help="keep the caches here (reused by later runs) [a temporary folder]")
    parser.add_argument("--child", choices=("memory", "stream"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warm", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory(prefix="token-stream-") as temp:
        return run_benchmark(args, Path(args.workdir or temp))


def run_benchmark(args, workdir: Path) -> dict:
    import torch

    load = OtherLoad()
    use_threads(args.threads)  # as in the measured processes, so the ending describes their threads
    print(f"torch threads in each run: {torch.get_num_threads()}{'' if args.threads else ' (its default)'}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    counts = (args.train, args.val, args.test)
    started = time.perf_counter()
    cache = write_token_cache(workdir / f"tokens-{'-'.join(map(str, counts))}.h5", counts)
    warm = write_token_cache(workdir / "tokens-warm-up.h5", (48, 16, 16))
    written_s = time.perf_counter() - started
    float32, float16 = token_bytes(cache)
    print(f"cache: {cache} ({cache.stat().st_size / 2**20:,.0f} MiB; ready in {written_s:.1f} s), "
          f"{counts[0]:,} / {counts[1]:,} / {counts[2]:,} rows, text {TEXT_LENGTH} x {TEXT_DIM}, image {PATCHES} x "
          f"{IMAGE_DIM}; token arrays {float16 / 2**20:,.0f} MiB as float16, {float32 / 2**20:,.0f} MiB as "
          f"float32; {CONFIG}", flush=True)
    trials = {"memory": [], "stream": []}
    resident = {"memory": [], "stream": []}
    for repeat in range(args.repeats):  # alternating, so slow spells from other processes hit both modes alike
        for mode in trials:
            if args.cold:
                drop_page_cache(cache)
            resident[mode].append(cached_fraction(cache))
            trials[mode].append(run_child(args, mode, cache, warm))
            print(f"  run {repeat + 1}, {mode}: load {trials[mode][-1]['load_s']:.2f} s, epoch "
                  f"{trials[mode][-1]['epoch_s']:.2f} s", flush=True)
    runs = {mode: fastest(runs) for mode, runs in trials.items()}
    report(args, runs, resident, float32)
    memory, stream = runs["memory"], runs["stream"]
    summary = {"stream_epoch_ratio": round(stream["epoch_s"] / memory["epoch_s"], 3),
               "stream_peak_rss_mb": round(stream["growth_mb"]),
               "memory_peak_rss_mb": round(memory["growth_mb"]),
               "token_float32_mb": round(float32 / 2**20),
               "stream_load_ratio": round(stream["load_s"] / memory["load_s"], 3),
               "stream_wait_fraction": round(stream["reads"]["wait_s"] / stream["epoch_end_s"], 3),
               "page_cached_min": {mode: _round(min(values, key=lambda v: 2 if v is None else v))
                                   for mode, values in resident.items()},
               "threads": memory["threads"], "repeats": args.repeats}
    return finish(summary, other_cores=load.cores())


def fastest(runs: list[dict]) -> dict:
    """The run with the fastest epoch (other processes only ever add time), with the fastest load among the runs
    and the largest peak growth."""
    best = dict(min(runs, key=lambda run: run["epoch_s"]))
    best.update(load_s=min(run["load_s"] for run in runs), growth_mb=max(run["peak_mb"] - run["before_mb"]
                                                                        for run in runs),
                epochs=[run["epoch_s"] for run in runs])
    return best


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def report(args, runs: dict, resident: dict, float32: int) -> None:
    names = {"memory": "in-memory", "stream": "streamed"}
    print(f"{'mode':<10} {'load s':>7} {'epoch s':>8} {'CPU user s':>11} {'sys s':>6} {'faults':>7} "
          f"{'train_head s':>13} {'RSS before MiB':>15} {'after load':>11} {'peak growth MiB':>16} "
          f"{'in page cache':>14}")
    for mode, run in runs.items():
        print(f"{names[mode]:<10} {run['load_s']:>7.2f} {run['epoch_s']:>8.2f} {run['epoch_user_s']:>11.2f} "
              f"{run['epoch_sys_s']:>6.2f} {run['epoch_faults'] / 1e6:>6.2f}M {run['train_head_s']:>13.2f} "
              f"{run['before_mb']:>15,.0f} {run['loaded_mb'] - run['before_mb']:>+11,.0f} {run['growth_mb']:>16,.0f} "
              f"{_share(resident[mode]):>14}")
    memory, stream = runs["memory"], runs["stream"]
    reads, epoch = stream["reads"], stream["epoch_end_s"]
    read_mb = reads["rows"] * float32 / 2 / sum(stream["rows"].values()) / 2**20
    epochs = {mode: ", ".join(f"{seconds:.2f}" for seconds in run["epochs"]) for mode, run in runs.items()}
    print(f"fastest of {args.repeats} alternating runs per mode (epoch s: in-memory {epochs['memory']}; streamed "
          f"{epochs['stream']}); its figures, except load s (the fastest) and peak growth (the largest)")
    print(f"epoch = the training pass over {memory['rows']['train']:,} rows + the validation pass over "
          f"{memory['rows']['val']:,} (CPU: all threads over the epoch; faults: minor page faults in it); train_head "
          f"adds the test pass. Peak growth: VmHWM over VmRSS before loading"
          f"{'' if all(r['peak_reset'] for r in runs.values()) else ' (VmHWM could not be reset: includes warm-up)'}.")
    print(f"streamed epoch ({epoch:.2f} s): {reads['rows']:,.0f} rows in {reads['batches']:,.0f} reads, "
          f"{read_mb:,.0f} MiB of float16; on the read-ahead thread TokenRows.rows took {reads['read_s']:.2f} s "
          f"({reads['read_cpu_s']:.2f} s CPU; {read_mb / max(reads['read_s'], 1e-9):,.0f} MiB/s; HDF5 + finiteness "
          f"check), StreamedSplit.rows {reads['rows_s']:.2f} s ({reads['rows_cpu_s']:.2f} s CPU; + float32 "
          f"conversion); the training thread waited {reads['wait_s']:.2f} s for minibatches "
          f"({reads['wait_s'] / epoch:.0%} of the epoch: the part the read-ahead did not hide)")
    extra = stream["epoch_s"] - memory["epoch_s"]
    print(f"streamed / in-memory: epoch {stream['epoch_s'] / memory['epoch_s']:.2f}x ({extra:+.2f} s; the read-ahead "
          f"thread used {reads['rows_cpu_s']:.2f} s CPU, the training thread waited {reads['wait_s']:.2f} s), load "
          f"{stream['load_s'] / memory['load_s']:.3f}x, peak RSS growth "
          f"{stream['growth_mb'] / memory['growth_mb']:.3f}x; "
          f"token arrays as float32: {float32 / 2**20:,.0f} MiB")
    if args.cold:
        cold = "--cold: the file's pages were dropped before each run, so its reads came from the disk"
    else:
        cold = ("without --cold the file stays in the page cache after it is written or read, so its reads came from "
                "memory, not the disk (--cold drops its pages before each run)")
    print(f"page cache: {cold}; resident before the in-memory run {_share(resident['memory'])}, before the streamed "
          f"run {_share(resident['stream'])}")


def _share(values: list[float | None]) -> str:
    """The resident share before each run of a mode, as a range."""
    known = [value for value in values if value is not None]
    if not known:
        return "unknown"
    low, high = min(known), max(known)
    return f"{low:.0%}" if f"{low:.0%}" == f"{high:.0%}" else f"{low:.0%}-{high:.0%}"


if __name__ == "__main__":
    main()
