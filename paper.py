"""The paper's settings, in one place: its encoders, its grid, its heads and ablations, its datasets with the folders
they unpack to and the metrics their literature reports, and the names of those metrics.

Everything here is data: no torch, no I/O, so any layer (and a command checking its arguments) can read it for free.
"""

from __future__ import annotations

from dataclasses import dataclass

TEXT_MODEL = "bert-base-uncased"
IMAGE_MODEL = "facebook/dinov2-small"

# The heads the paper compares, and the two ablations that each keep one modality.
HEADS = ("basic", "self_attn", "dual_attn")
ABLATIONS = ("text_only", "image_only")

# The grid: 3 heads x 4 learning rates x 3 dropouts x 4 losses = 144 configurations.
LRS = (1e-2, 1e-3, 1e-4, 1e-5)
DROPOUTS = (0.0, 0.2, 0.5)
LOSSES = ("ce", "focal2", "focal3", "focal4")

# The metrics every result carries (heads/metrics.py computes them), and how a table or figure names them.
METRICS = ("accuracy", "weighted_f1", "macro_f1")
METRIC_TITLES = {"accuracy": "accuracy", "weighted_f1": "weighted F1", "macro_f1": "macro F1"}


@dataclass(frozen=True)
class PaperDataset:
    name: str  # as `fusion extract --dataset` names it
    title: str
    folders: tuple[str, ...]  # what its download unpacks to, as `fusion reproduce --data` looks for it
    metric: str  # the one selection and the headline use
    reported: tuple[str, ...]  # what its literature reports


DATASETS: dict[str, PaperDataset] = {d.name: d for d in (
    PaperDataset("mvsa-single", "MVSA-Single", ("MVSA_Single", "MVSA-Single", "mvsa_single", "mvsa-single"),
                 "weighted_f1", ("accuracy", "weighted_f1")),
    PaperDataset("mvsa-multi", "MVSA-Multi", ("MVSA", "MVSA_Multi", "MVSA-Multi", "mvsa_multi", "mvsa-multi"),
                 "weighted_f1", ("accuracy", "weighted_f1")),
    # SemEval-2020 Task 8, task A, is scored by macro F1.
    PaperDataset("memotion", "Memotion 7k (task A)", ("memotion_dataset_7k",), "macro_f1", ("macro_f1",)),
)}


def dataset_metric(dataset: str | None) -> str:
    """The validation metric a dataset is selected on: its literature's; macro F1 (every class counts) for others."""
    return DATASETS[dataset].metric if dataset in DATASETS else "macro_f1"


def metric_title(metric: str) -> str:
    return METRIC_TITLES.get(metric, metric)
