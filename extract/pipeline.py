"""Stage 1: read a dataset, run the frozen encoders once, write the embeddings cache.

    fusion extract --dataset mvsa-single --root data/MVSA_Single --out caches/mvsa-single.h5
    torchrun --nproc-per-node 4 -m fusion.cli extract --dataset mvsa-single --root data/MVSA_Single   # 4 ranks

The work is planned as a fixed list of rows (the dataset's samples in split order); every batch is written by row
index into `OUT.partial/`, so an interrupted run (even `kill -9`) resumes with the rows still pending. When every row
is done the partial batches are merged into the final HDF5 file by an atomic rename. Batches are cut once from the
texts sorted by length and dealt out to the ranks, so the cache is the same bit for bit for any number of ranks.
Speed: texts are tokenised once up front, images decoded to uint8 crops in DataLoader workers (normalised on the
encoders' device) while the encoders run, and every batch streams to disk from a writer thread as it finishes
(`benchmarks/extract_speed.py` and `benchmarks/gpu_check.sh` measure it against the bare forward).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers

from fusion.version import __version__
from fusion.cache.fingerprint import fingerprint
from fusion.cache.partial import FORMAT_VERSION, PLAN_FILE, PartialCache, Plan, partial_dir, read_plan
from fusion.cache.pooling_check import refuse_other_pooling
from fusion.cache.reader import check_header, is_complete_cache, open_cache
from fusion.cache.writer import finalize, remove_leftover_partial
from fusion.errors import CacheError
from fusion.extract.batch_writer import BatchWriter
from fusion.extract.batches import (default_decode_workers, fitted_workers, image_loader, length_sorted_batches,
                                    shared_memory_free)
from fusion.extract.datasets.registry import load_dataset
from fusion.extract.embedding import embed_posts
from fusion.extract.distributed import barrier, rank_device, sum_over_ranks
from fusion.extract.duplicates import drop_duplicates, find_duplicates, image_digests
from fusion.extract.encoders import Encoders, fit_max_length, load_encoders
from fusion.extract.pooling import check_token_widths
from fusion.extract.datasets.samples import DatasetSamples, Sample
from fusion.extract.datasets.splitfile import read_split_file, with_splits
from fusion.labels import LABELS, SPLITS
from fusion.paper import IMAGE_MODEL, TEXT_MODEL

LOADING_SKIP = "skipped while reading the dataset"


@dataclass(frozen=True)
class ExtractConfig:
    dataset: str
    root: Path
    out: Path
    text_model: str = TEXT_MODEL
    image_model: str = IMAGE_MODEL
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 32
    tokens: bool = False
    limit: int | None = None
    max_length: int = 128
    split_seed: int = 0
    workers: int | None = 1  # image-decoding workers of this rank; None: from the node's cores and ranks
    trust_remote_code: bool = False
    split_file: Path | None = None  # CSV/TSV of id,split fixing the splits (extract/datasets/splitfile.py)
    text_pooling: str | None = None  # None: cls, or projected for a dual encoder (extract/pooling.py)
    image_pooling: str | None = None
    columns: str | None = None  # --dataset hf: image=COL,text=COL,label=COL[,id=COL] (extract/datasets/hfdata.py)
    dedupe: bool = False  # drop val/test posts that duplicate a training post (extract/duplicates.py)


@dataclass
class ExtractSummary:
    out: Path
    counts: dict[str, dict[str, int]]
    skipped: list[tuple[str, str, str]]
    cleaning: dict[str, int]
    text_fallbacks: dict[str, int]
    rows_total: int
    rows_computed: int
    seconds: float
    already_complete: bool = False
    split_source: dict[str, str] = dataclasses.field(default_factory=dict)
    split_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)  # what slowed the run down and how to avoid it
    duplicates: dict = dataclasses.field(default_factory=dict)  # posts shared across splits (extract/duplicates.py)
    rank: int = 0  # of the process that returned it (torchrun); rank 0 speaks for the whole job

    @property
    def samples_per_second(self) -> float:
        return self.rows_computed / self.seconds if self.seconds > 0 else 0.0


ProgressCallback = Callable[[int, int], None]  # (rows done so far, rows in total)


def extract(config: ExtractConfig, on_progress: ProgressCallback | None = None, *, rank: int = 0,
            world_size: int = 1) -> ExtractSummary:
    started = time.perf_counter()
    config = dataclasses.replace(config, device=rank_device(config.device, world_size))
    split_file = read_split_file(config.split_file) if config.split_file else None  # a bad file fails first
    data = load_dataset(config.dataset, config.root, seed=config.split_seed, columns=config.columns)
    data = limit_samples(with_splits(data, split_file, config.split_seed), config.limit)
    encoders = load_encoders(config.text_model, config.image_model, device=config.device,
                             precision=config.precision, trust_remote_code=config.trust_remote_code,
                             text_pooling=config.text_pooling, image_pooling=config.image_pooling)
    if config.tokens:
        check_token_widths(encoders.text_pooling, encoders.image_pooling)
    config = dataclasses.replace(config, max_length=fit_max_length(encoders, config.max_length))
    plan = make_plan(config, data, encoders)
    refuse_other_pooling(config.out, plan.attrs)
    if config.out.exists():
        if not is_complete_cache(config.out, plan.fingerprint):
            raise CacheError(f"{config.out} exists and was made for other settings{other_device(config.out, plan)} "
                             f"or is damaged; delete it or choose another --out")
        remove_leftover_partial(config.out)  # a kill between the final rename and the cleanup leaves it
        return summarise_extraction(config, data, plan, rows_computed=0, started=started, already_complete=True)
    resuming = partial_dir(config.out).exists()
    if config.tokens and not resuming:
        # Before the duplicate pass, which decodes every image: with every row still to compute (--dedupe can only
        # make it fewer), a disk that cannot hold them is refused at once.
        check_disk_for_tokens(config.out, encoders, config.max_length, len(plan.ids), len(plan.ids))
    data, plan = with_duplicates(config, data, encoders)
    refuse_resume_on_other_device(config.out, plan)
    notes: list[str] = []
    partial = PartialCache.open(config.out, plan=plan, rank=rank)
    try:
        if config.tokens and resuming:  # only its pending rows' batches are still to be written
            check_disk_for_tokens(config.out, encoders, config.max_length, len(partial.pending()), len(plan.ids))
        computed = run_batches(config, data, encoders, partial, rank, world_size, on_progress, notes)
    finally:
        partial.close()
    barrier()  # every rank's batches are written before rank 0 merges them
    computed = sum_over_ranks(computed)  # the summary reports the whole job's rows
    if rank == 0:
        finalize([partial_dir(config.out)], config.out)
    barrier()  # and the final file exists before any rank reports
    summary = summarise_extraction(config, data, plan, rows_computed=computed, started=started)
    summary.notes.extend(notes)
    summary.rank = rank
    return summary


def other_device(out: Path, plan: Plan) -> str:
    """' (on cuda; this run is on cpu)' when the cache at `out` was made on another device type, else ''."""
    try:
        with open_cache(out) as h5:
            made_on = check_header(h5, out).get("device_type")
    except CacheError:
        return ""
    wanted = plan.attrs["device_type"]
    return f" (on {made_on}; this run is on {wanted})" if made_on and made_on != wanted else ""


def refuse_resume_on_other_device(out: Path, plan: Plan) -> None:
    """A partial cache is resumed only on the device type it was started on: bf16 is another computation on the
    CPU (autocast) than on a GPU (the model cast), and no row may mix the two (device.py encoder_dtypes)."""
    if not (partial_dir(out) / PLAN_FILE).exists():
        return
    try:
        started_on = read_plan(partial_dir(out)).attrs.get("device_type")
    except CacheError:
        return  # PartialCache.open says what is wrong with it
    wanted = plan.attrs["device_type"]
    if started_on and started_on != wanted:
        raise CacheError(f"{partial_dir(out)} was started on {started_on} with --precision "
                         f"{plan.attrs['precision']}; this run is on {wanted}, whose numbers would differ: resume it "
                         f"with --device {started_on}, or delete the folder to start again on {wanted}")


def check_disk_for_tokens(out: Path, encoders: Encoders, max_length: int, pending: int, rows: int) -> None:
    """--tokens stores every row's whole sequences in float16 (2 bytes a value): rows x (text tokens x text width +
    image tokens x image width). They are on disk twice at the peak, as batches in OUT.partial/ and merged into OUT
    (cache/writer.py finalize removes the batches after the merge), so the pending rows' batches and the whole cache
    must fit in the disk's free space; otherwise the run is refused before any row is computed."""
    (text_tokens, text_width), (image_tokens, image_width) = encoders.token_shapes(max_length)
    per_row = 2 * (text_tokens * text_width + image_tokens * image_width)
    needed = per_row * (pending + rows)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if needed > free:
        raise CacheError(f"{out}: --tokens needs about {_size(needed)} free on its disk, which has {_size(free)} free "
                         f"({rows:,} rows x ({text_tokens} text tokens x {text_width} + {image_tokens} image tokens x "
                         f"{image_width}) x 2 bytes = {_size(per_row * rows)}, on disk twice while the batches are "
                         "merged); free space, or extract without --tokens")


def _size(size: int) -> str:
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if size >= 1024 ** power:
            return f"{size / 1024 ** power:.1f} {unit}"
    return f"{size} B"


def with_duplicates(config: ExtractConfig, data: DatasetSamples, encoders: Encoders) -> tuple[DatasetSamples, Plan]:
    """Posts shared across splits counted (every image decoded once for its pixel hash), dropped from val and test
    with --dedupe, and the rows planned with the counts recorded. Runs only when there is something to extract, after
    the fingerprint has ruled out a complete cache; every rank computes the same result."""
    workers = default_decode_workers(encoders.device.type) if config.workers is None else config.workers
    duplicates = find_duplicates(data.samples, image_digests([s.image for s in data.samples], workers=workers))
    if config.dedupe:
        data = drop_duplicates(data, duplicates)
    return data, make_plan(config, data, encoders, duplicates=duplicates.record(dedupe=config.dedupe))


def limit_samples(data: DatasetSamples, limit: int | None) -> DatasetSamples:
    """Keep about `limit` samples, in the same proportions per split (a quick look at a big dataset)."""
    if not limit or limit >= len(data.samples):
        return data
    by_split = {split: [s for s in data.samples if s.split == split] for split in SPLITS}
    kept = [s for split in SPLITS
            for s in by_split[split][:max(1, round(limit * len(by_split[split]) / len(data.samples)))]
            if by_split[split]]
    return dataclasses.replace(data, samples=kept)


def make_plan(config: ExtractConfig, data: DatasetSamples, encoders: Encoders, *,
              duplicates: dict | None = None) -> Plan:
    """Rows = the dataset's samples in split order, then the samples already skipped while reading the dataset (and
    those --dedupe dropped). `duplicates` (Duplicates.record) goes into the attributes, not the fingerprint: it follows
    from the dataset's files and the flag, which the fingerprint holds."""
    settings = {
        "format_version": FORMAT_VERSION, "dataset": config.dataset,
        "text_model": encoders.text_name, "text_model_revision": encoders.text_revision,
        "image_model": encoders.image_name, "image_model_revision": encoders.image_revision,
        **encoders.recorded_pooling, "max_length": config.max_length,
        "image_size": encoders.image_size, "split_seed": config.split_seed, "precision": config.precision,
        "device_type": encoders.device.type,
        "tokens": config.tokens, "limit": config.limit or 0, "preprocessing": encoders.preprocessing(),
        **data.settings,
        # Only when on, so that caches made before --dedupe existed keep their fingerprint.
        **({"dedupe": True} if config.dedupe else {}),
    }
    attrs = {key: value for key, value in settings.items() if key != "preprocessing"}
    attrs.update(fingerprint=fingerprint(settings, data.source_files), text_dim=encoders.text_dim,
                 image_dim=encoders.image_dim, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 torch_version=torch.__version__, transformers_version=transformers.__version__,
                 fusion_version=__version__, **data.split_source,
                 **({"duplicates": duplicates} if duplicates is not None else {}))
    return Plan(fingerprint=attrs["fingerprint"], attrs=attrs,
                ids=[s.id for s in data.samples] + [sid for sid, _, _ in data.skipped],
                splits=[s.split for s in data.samples] + [split for _, split, _ in data.skipped],
                labels=[s.label for s in data.samples] + [-1] * len(data.skipped))


def run_batches(config: ExtractConfig, data: DatasetSamples, encoders: Encoders, partial: PartialCache,
                rank: int, world_size: int, on_progress: ProgressCallback | None, notes: list[str]) -> int:
    samples, pending = data.samples, partial.pending()
    token_ids = tokenize(encoders, samples, config.max_length)
    mine = shard_batches(token_ids, config.batch_size, rank, world_size)
    batches = pending_batches(mine, pending)
    # Rows of samples dropped while reading the dataset need no encoder: rank 0 records them.
    loading_skips = pending[pending >= len(samples)] if rank == 0 else pending[:0]
    total = sum(map(len, mine)) + (len(data.skipped) if rank == 0 else 0)
    done = total - sum(map(len, batches)) - len(loading_skips)
    if len(loading_skips):
        reasons = {int(i): data.skipped[int(i) - len(samples)][2] for i in loading_skips}
        partial.write_batch(loading_skips, {}, reasons)
        done += len(loading_skips)
    loader = decode_loader(config, encoders, [s.image for s in samples], batches, notes)
    if on_progress:
        on_progress(done, total)
    written = [0]

    def on_written(rows: int) -> None:  # on the writer's thread, once the batch file is on disk
        written[0] += rows
        if on_progress:
            on_progress(done + written[0], total)

    with BatchWriter(partial, on_written) as writer:
        for batch in loader:
            indices, _, skipped = batch
            writer.put(np.array(sorted([*indices, *skipped]), dtype=np.int64),
                       embed_batch(encoders, token_ids, batch, config.tokens), skipped)
    return written[0]


def decode_loader(config: ExtractConfig, encoders: Encoders, image_paths: list, batches: list[list[int]],
                  notes: list[str]):
    """The workers decoding this rank's images: --workers, or this rank's share of the node's cores; fewer when
    /dev/shm cannot hold their batches (a note then says what to do)."""
    batch_bytes = config.batch_size * encoders.pixels.bytes_per_image(encoders.image_size)
    workers, note = fitted_workers(config.workers if batches else 0, encoders.device.type, batch_bytes,
                                   shared_memory_free())
    if note:
        notes.append(note)
    return image_loader(image_paths, encoders.pixels, batches, workers=workers,
                        pin_memory=encoders.device.type == "cuda")


def shard_batches(token_ids: list[list[int]], batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches: the length-sorted batches of the whole dataset, cut once, dealt out round-robin,
    longest texts first.

    Cutting before sharding means a row meets the encoders in the same batch (same padding, same shapes, so
    bit-identical embeddings) whatever the number of ranks, and a run can resume under another world size;
    dealing round-robin gives every rank a similar mix of short and long texts, so no rank finishes last by far.
    Longest first: memory peaks with the longest batch, so a run that will not fit fails in its first minute
    rather than its last, and the progress bar's estimate errs on the long side.
    """
    lengths = np.array([len(ids) for ids in token_ids] or [0])
    everything = length_sorted_batches(np.arange(len(token_ids)), lengths, batch_size)[::-1]
    return everything[rank::world_size]


def pending_batches(batches: list[list[int]], pending: np.ndarray) -> list[list[int]]:
    """The batches pruned to the rows not done yet. A batch file holds a whole batch, so a resumed run feeds each
    row to the encoders in the same batch as an uninterrupted run would, and results are identical."""
    todo = set(pending.tolist())
    pruned = ([i for i in batch if i in todo] for batch in batches)
    return [batch for batch in pruned if batch]


def tokenize(encoders: Encoders, samples: list[Sample], max_length: int) -> list[list[int]]:
    if not samples:
        return []
    encoded = encoders.tokenizer([s.text for s in samples], truncation=True, max_length=max_length)
    return encoded["input_ids"]


def embed_batch(encoders: Encoders, token_ids: list[list[int]], batch, with_tokens: bool) -> dict[str, torch.Tensor]:
    """One loader batch through both encoders; rows in ascending index order, skipped rows left out; the arrays stay
    on the device (the writer thread copies them)."""
    indices, pixels, _ = batch
    if not indices:
        return {}
    order = np.argsort(indices)
    # Copied as they come (pinned by the loader, so the copy overlaps), reordered on the device.
    pixels = pixels.to(encoders.device, non_blocking=encoders.device.type == "cuda")
    pixels = pixels[torch.from_numpy(order).to(encoders.device)]
    return embed_posts(encoders, [token_ids[indices[i]] for i in order], pixels, with_tokens=with_tokens,
                       on_host=False)


def summarise_extraction(config: ExtractConfig, data: DatasetSamples, plan: Plan, *, rows_computed: int,
                         started: float, already_complete: bool = False) -> ExtractSummary:
    counts = {split: {name: 0 for name in LABELS} for split in SPLITS}
    skipped = list(data.skipped)
    duplicates = plan.attrs.get("duplicates")
    if config.out.exists():
        from fusion.cache.reader import read_json_attribute, read_skipped
        skipped = read_skipped(config.out)
        duplicates = read_json_attribute(config.out, "duplicates")
    skipped_ids = {(sid, split) for sid, split, _ in skipped}
    tally = Counter((s.split, s.label) for s in data.samples if (s.id, s.split) not in skipped_ids)
    for (split, label), count in tally.items():
        counts[split][LABELS[label]] = count
    return ExtractSummary(out=config.out, counts=counts, skipped=skipped, cleaning=dict(data.cleaning),
                          text_fallbacks=dict(data.text_fallbacks), rows_total=len(plan.ids),
                          rows_computed=rows_computed, seconds=time.perf_counter() - started,
                          already_complete=already_complete, split_source=dict(data.split_source),
                          split_counts=dict(data.split_counts), duplicates=duplicates or {})
