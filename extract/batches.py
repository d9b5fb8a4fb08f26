"""Batches for extraction: texts tokenised once up front, images decoded in DataLoader workers.

Batches are formed from texts sorted by length, so each batch pads to its own longest text rather than to max_length;
rows carry their global index and are written by index, so the order of batches never matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fusion.extract.images import ImageUnreadable, load_rgb


class DecodedImages(Dataset):
    """Global row index -> (index, pixel_values or None, skip reason or None); runs in the workers."""

    def __init__(self, image_paths: Sequence, processor):
        self.image_paths = image_paths
        self.processor = processor

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int):
        try:
            return index, image_pixels(self.image_paths[index], self.processor), None
        except ImageUnreadable as error:
            return index, None, str(error)


def image_pixels(path, processor) -> torch.Tensor:
    """One image file decoded (with the bomb and format checks of images.load_rgb) and preprocessed for the encoder;
    ImageUnreadable says why not. An image stored in a dataset table (extract/hfdata.py StoredImage) is read here,
    in the worker, as bytes or a path."""
    if hasattr(path, "read_image"):
        path = path.read_image()
    return processor(images=load_rgb(path), return_tensors="pt")["pixel_values"][0]


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


def image_loader(image_paths: Sequence, processor, batches: list[list[int]], *, workers: int,
                 pin_memory: bool) -> DataLoader:
    # Two batches in flight per worker hide decoding jitter; more only holds decoded pixels in shared memory
    # (a 128-image batch is 77 MB in fp32) without making anything faster.
    return DataLoader(DecodedImages(image_paths, processor), batch_sampler=batches, collate_fn=collate,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=2 if workers else None)


def pad_token_ids(token_ids: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded to the batch's longest text, rounded up to `multiple` (see Encoders.pad_multiple)."""
    longest = -(-max(len(ids) for ids in token_ids) // multiple) * multiple
    input_ids = torch.full((len(token_ids), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask
