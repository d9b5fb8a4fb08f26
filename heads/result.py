"""What training one head returns; saved by heads/checkpoint.py and read back without importing the trainer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from fusion.heads.config import FitConfig


@dataclass
class TestPredictions:
    """The best weights' prediction for every test row, in the cache's test order: what a bootstrap resamples."""
    __test__ = False  # not a pytest class, despite its name

    y_true: list[int]
    y_pred: list[int]
    ids: list[str] | None = None  # the cache's test ids, when the features carried them
    logits: list[list[float]] | None = None  # the raw (uncalibrated) logits per row: the report's reliability diagram

    def as_dict(self) -> dict:
        kept = {"ids": self.ids, "y_true": self.y_true, "y_pred": self.y_pred}
        return kept if self.logits is None else {**kept, "logits": self.logits}


def encode_labels(labels) -> str:
    """Class ids 0..2 as a digit string ("0210..."): one byte a row in results.json, where every config keeps one."""
    return "".join(map(str, np.asarray(labels, dtype=np.int64).tolist()))


def decode_labels(digits: str) -> np.ndarray:
    return np.frombuffer(digits.encode("ascii"), dtype=np.uint8).astype(np.int64) - ord("0")


@dataclass
class FitResult:
    config: FitConfig
    best_epoch: int
    epochs_run: int
    history: list[dict]  # one entry per epoch: epoch, train_loss, val_loss and the val metrics
    val: dict  # the best epoch's validation metrics (+ loss)
    test: dict | None  # test metrics (+ loss, confusion_matrix) of the best-on-validation weights; None without test
    state_dict: dict[str, Tensor]  # the best weights of this one model (single-head layout, CPU)
    seconds: float  # wall-clock seconds of the (shared) pass until this model stopped
    test_predictions: TestPredictions | None = None  # None without a test split
    pruned_at: int | None = None  # the rung epoch at which `grid --prune` stopped it; None: it ran to its own end
    device: str = "cpu"  # where it trained (not part of the config: it changes no result beyond float rounding)
    # heads/posthoc/record.py: the temperature fitted on validation, with validation NLL and test ECE before and after
    calibration: dict | None = None
    train_means: dict[str, Tensor] | None = None  # "text", "image": the training split's mean pooled embeddings
