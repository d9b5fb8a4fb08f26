"""How far the probabilities can be trusted: the test split's expected calibration error (ECE) before and after the
run's temperature, and the reliability diagram, for report.md; the seed-mean ECE of a grid's configuration for
reproduction.md.

The arithmetic (temperature, ECE over 15 equal-width bins, the bins themselves) is heads/posthoc/calibration.py's,
the one place both the trainer (which records every grid row's ECE) and the reports compute it. A run keeps its test
rows' raw logits in test_predictions.json; the calibrated probabilities are softmax(logits / temperature).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fusion.app.handles import Run, json_field
from fusion.app.reporting import markdown
from fusion.app.reporting.figures import new_figure, save_png
from fusion.errors import RunError
from fusion.heads.checkpoint import PREDICTIONS_FILE, read_json
from fusion.heads.posthoc.calibration import ECE_BINS, calibrated, expected_calibration_error, reliability_bins

RELIABILITY_FILE = "reliability_test.png"
ECE_NOTE = (f"ECE: expected calibration error, the test rows binned by their top probability into {ECE_BINS} "
            "equal-width bins, each bin's |accuracy - mean top probability| weighted by its share of the rows (lower "
            "is better). The temperature divides the logits; it was fitted on the validation split (NLL, LBFGS) and "
            "never changes a label.")


@dataclass(frozen=True)
class TestCalibration:
    __test__ = False  # not a pytest class, despite its name

    temperature: float
    labels: np.ndarray  # (N,) the test rows' classes
    raw: np.ndarray  # (N, 3) the head's own probabilities
    calibrated: np.ndarray  # (N, 3) softmax(logits / temperature)

    @property
    def ece_raw(self) -> float:
        return expected_calibration_error(self.raw, self.labels)

    @property
    def ece(self) -> float:
        return expected_calibration_error(self.calibrated, self.labels)


def run_calibration(run: Run) -> TestCalibration | None:
    """The run's test probabilities before and after its temperature; None for a run written before temperatures
    (no temperature, or no test logits)."""
    temperature, path = run.config.get("temperature"), run.path / PREDICTIONS_FILE
    if temperature is None or not path.is_file():
        return None
    predictions = read_json(path)
    if "logits" not in predictions:
        return None
    labels = json_field(predictions, "y_true", path, "list")
    logits = json_field(predictions, "logits", path, "list")
    try:
        values = torch.tensor(logits, dtype=torch.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or values.shape != (len(labels), 3):
        raise RunError(f"{path}: 'logits' must hold 3 numbers for each of the {len(labels)} test rows")
    return TestCalibration(float(temperature), np.asarray(labels, dtype=np.int64), calibrated(values, None).numpy(),
                           calibrated(values, float(temperature)).numpy())


def calibration_figure(run: Run) -> Path | None:
    """RUN/reliability_test.png, or None for a run without temperature."""
    found = run_calibration(run)
    return None if found is None else plot_reliability(found, run.path / RELIABILITY_FILE)


def plot_reliability(found: TestCalibration, path: Path) -> Path:
    """Two panels, before and after the temperature: each bin's accuracy against its mean top probability (a
    perfectly calibrated head lies on the diagonal), with the rows per bin beneath."""
    figure = new_figure(9.0, 4.6)
    panels = figure.subplots(2, 2, sharex=True, height_ratios=(3, 1))
    for column, (title, probabilities, ece) in enumerate((
            ("raw (the head's softmax)", found.raw, found.ece_raw),
            (f"calibrated (temperature {found.temperature:.3f})", found.calibrated, found.ece))):
        bins = reliability_bins(probabilities, found.labels)
        centres, width = (bins["low"] + bins["high"]) / 2, 1.0 / ECE_BINS
        filled = bins["count"] > 0
        axes = panels[0, column]
        axes.bar(centres[filled], bins["accuracy"][filled], width=width, color="tab:blue", edgecolor="white",
                 label="accuracy")
        axes.bar(centres[filled], (bins["confidence"] - bins["accuracy"])[filled], width=width,
                 bottom=bins["accuracy"][filled], fill=False, hatch="//", edgecolor="tab:red", linewidth=0.8,
                 label="gap to the bin's mean top probability")
        axes.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1)
        axes.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{title}\ntest ECE {ece:.4f}")
        axes.legend(fontsize="x-small", loc="upper left")
        counts = panels[1, column]
        counts.bar(centres, bins["count"], width=width, color="0.5")
        counts.set(xlabel="top probability (bin)", ylabel="rows")
    return save_png(figure, path)


def calibration_lines(run: Run) -> list[str]:
    """report.md's calibration section of a run: the table of temperature, validation NLL and test ECE before and
    after, and how to read it."""
    found = run_calibration(run)
    if found is None:
        return ["Uncalibrated: this run was written before fusion fitted a temperature on validation (fit it again "
                "for calibrated probabilities and their ECE).", ""]
    fitted = run.metrics.get("calibration") or {}
    rows = [["raw (the head's softmax)", "1", markdown.number(fitted.get("val_nll_raw")),
             f"{found.ece_raw:.4f}"],
            ["calibrated (default of predict and serve)", f"{found.temperature:.4f}",
             markdown.number(fitted.get("val_nll")), f"{found.ece:.4f}"]]
    header = ["probabilities", "temperature", "val NLL", f"test ECE ({ECE_BINS} bins, n={len(found.labels)})"]
    return markdown.table(header, rows) + [ECE_NOTE, ""]


def seed_mean_ece(rows: list[dict], config: dict) -> tuple[float, float] | None:
    """The test ECE (raw, calibrated) of a grid configuration (`config` without its seed), the mean over the seeds
    whose rows recorded it; None when none did (rows written before temperatures)."""
    found = [row["calibration"] for row in rows
             if {key: value for key, value in row["config"].items() if key != "seed"} == config
             and isinstance(row.get("calibration"), dict) and row["calibration"].get("test_ece") is not None]
    if not found:
        return None
    return (statistics.fmean(block["test_ece_raw"] for block in found),
            statistics.fmean(block["test_ece"] for block in found))


def ece_cell(ece: tuple[float, float] | None) -> str:
    """'0.1234 → 0.0456' (raw → calibrated), '–' when the rows predate temperatures."""
    return "–" if ece is None else f"{ece[0]:.4f} → {ece[1]:.4f}"
