"""What training one head returns; saved by heads/checkpoint.py and read back without importing the trainer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fusion.heads.config import FitConfig


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
    pruned_at: int | None = None  # the rung epoch at which `grid --prune` stopped it; None: it ran to its own end
    device: str = "cpu"  # where it trained (not part of the config: it changes no result beyond float rounding)
