"""Batches for extraction: texts tokenised once up front, images decoded in DataLoader workers.

Batches are formed from texts sorted by length, so each batch pads to its own longest text rather than to max_length;
rows carry their global index and are written by index, so the order of batches never matters. The workers ship
uint8 crops where the image processor allows it (extract/pixels.py); how many workers a rank gets comes from the
node's cores, the ranks sharing them (`default_decode_workers`) and the free shared memory (`fit_to_shared_memory`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fusion.extract.images import ImageUnreadable, load_rgb
from fusion.extract.pixels import PixelPipeline

PREFETCH_BATCHES = 2  # per worker
SHARED_MEMORY = "/dev/shm"


class DecodedImages(Dataset):
    """Global row index -> (index, pixel_values or None, skip reason or None); runs in the workers."""

    def __init__(self, image_paths: Sequence, pixels):
        self.image_paths = image_paths
        self.pixels = as_pipeline(pixels)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int):
        try:
            return index, image_pixels(self.image_paths[index], self.pixels), None
        except ImageUnreadable as error:
            return index, None, str(error)
        except Exception as error:  # noqa: BLE001 - one file must never stop an extraction: its row is skipped
            return index, None, f"image could not be decoded ({type(error).__name__})"


def as_pipeline(pixels) -> PixelPipeline:
    """An `Encoders.pixels` pipeline as is; a bare image processor runs its own full path."""
    return pixels if isinstance(pixels, PixelPipeline) else PixelPipeline(processor=pixels, split=False)


def image_pixels(path, pixels, *, max_pixels: int | None = None) -> torch.Tensor:
    """One image decoded (with the format, bomb and memory bounds of images.load_rgb) and preprocessed for the
    encoder (`pixels`: Encoders.pixels, or a bare image processor); ImageUnreadable says why not. `path`: a path,
    bytes, a binary file object, a PIL image, or an image stored in a dataset table (extract/datasets/hfdata.py
    StoredImage), read here, in the worker, as bytes or a path."""
    if hasattr(path, "read_image"):
        path = path.read_image()
    return as_pipeline(pixels).crop(load_rgb(path, max_pixels=max_pixels))


def length_sorted_batches(pending: np.ndarray, lengths: np.ndarray, batch_size: int) -> list[list[int]]:
    """Chunks of `pending` rows with similar text lengths (stable sort, so the batching is deterministic)."""
    order = pending[np.argsort(lengths[pending], kind="stable")]
    return [order[start:start + batch_size].tolist() for start in range(0, len(order), batch_size)]


def collate(items):
    indices = [index for index, pixels, _ in items if pixels is not None]
    pixels = [pixels for _, pixels, _ in items if pixels is not None]
    skipped = {index: reason for index, pixels, reason in items if pixels is None}
    stacked = torch.stack(pixels) if pixels else None
    return indices, stacked, skipped


def image_loader(image_paths: Sequence, pixels, batches: list[list[int]], *, workers: int,
                 pin_memory: bool) -> DataLoader:
    # Two batches in flight per worker hide decoding jitter; more only holds decoded pixels in shared memory
    # (a 128-image batch of 224x224 crops is 19 MB in uint8, 77 MB in fp32) without making anything faster.
    return DataLoader(DecodedImages(image_paths, pixels), batch_sampler=batches, collate_fn=collate,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=PREFETCH_BATCHES if workers else None)


def default_decode_workers(device_type: str) -> int:
    """This rank's share of the node's cores: the cores it may run on, split among the ranks of the node
    (torchrun's LOCAL_WORLD_SIZE). Beside a GPU each rank keeps one core to feed it; on the CPU the encoders need the
    cores too, so decoding gets half."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return max(1, share - 1 if device_type == "cuda" else share // 2)


def shared_memory_free() -> int | None:
    """Bytes free in /dev/shm, where workers hand decoded batches over; None where there is no such folder."""
    try:
        stats = os.statvfs(SHARED_MEMORY)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def fit_to_shared_memory(workers: int, batch_bytes: int, free: int | None) -> tuple[int, str | None]:
    """At most as many workers as /dev/shm holds batches for (each has PREFETCH_BATCHES in flight, one more is being
    taken over; every rank of the node shares the folder), and a note saying what to do when that is fewer.

    Too little /dev/shm (Docker gives 64 MB unless told otherwise) kills a worker with SIGBUS ("Bus error") when its
    batch does not fit. Switching torch's sharing strategy to file_system would not help: both strategies keep the
    tensors in /dev/shm. Fewer workers do, and with none the images are decoded in this process, without shared
    memory, only more slowly.
    """
    if free is None or workers == 0:
        return workers, None
    budget = 0.8 * free / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    fitting = max(0, int((budget / max(1, batch_bytes) - 1) // PREFETCH_BATCHES))
    if fitting >= workers:
        return workers, None
    return fitting, (f"{SHARED_MEMORY} has {free / 2**20:.1f} MiB free, too little for {workers} image-decoding "
                     f"workers ({PREFETCH_BATCHES} batches of {batch_bytes / 2**20:.1f} MiB each in flight): "
                     f"decoded with {fitting or 'no'} workers{' (in this process)' if not fitting else ''}, which may "
                     f"hold the encoders back; give the container more shared memory (docker run --shm-size=4g or "
                     f"--ipc=host) or lower --batch-size")


def fitted_workers(requested: int | None, device_type: str, batch_bytes: int,
                   free: int | None) -> tuple[int, str | None]:
    """The decode workers an extraction uses: `requested` (--workers), or this rank's share of the node's cores;
    fewer when `free` bytes of /dev/shm (shared_memory_free()) cannot hold their batches, with a note saying what
    to do."""
    workers = default_decode_workers(device_type) if requested is None else requested
    return fit_to_shared_memory(workers, batch_bytes, free)


def pad_token_ids(token_ids: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded to the batch's longest text, rounded up to `multiple` (see Encoders.pad_multiple)."""
    longest = -(-max(len(ids) for ids in token_ids) // multiple) * multiple
    input_ids = torch.full((len(token_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask
