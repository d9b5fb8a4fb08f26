"""Reports for a run directory (`fusion fit`) or a grid directory (`fusion grid`): PNG figures and report.md.

    report = write_report(Path("runs/fit"))   # Report(markdown=runs/fit/report.md, figures=[...png])

A run directory holds config.json and metrics.json; a grid directory holds results.json and best/ (a run directory).
Test metrics are shown beside the published numbers for memotion, mvsa-single and mvsa-multi. matplotlib is imported
inside the functions only, so the rest of fusion works without it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from fusion.atomic import write_atomic, write_text_atomic
from fusion.errors import FusionError, RunError
from fusion.heads.checkpoint import read_json
from fusion.heads.config import loss_label
from fusion.heads.grid import Summary, best_per_head, summarise
from fusion.labels import LABELS

PAPER_TEXT_MODEL = "bert-base-uncased"
PAPER_IMAGE_MODEL = "facebook/dinov2-small"
METRICS = ("accuracy", "weighted_f1", "macro_f1")
CACHE_FIELDS = ("cache.dataset", "cache.text_model", "cache.image_model")
METRIC_NAMES = {"accuracy": "accuracy", "weighted_f1": "weighted F1", "macro_f1": "macro F1"}


class Published(NamedTuple):
    model: str
    accuracy: float | None
    weighted_f1: float | None
    macro_f1: float | None
    source: str
    digits: int   # as many decimals as the source gave, so 0.69 is not shown as a spurious 0.6900


# The paper's F1 on MVSA is the weighted F1 (the literature's metric there); Memotion task A publishes macro F1 only.
# Rows: model, then (accuracy, weighted F1) on MVSA-Single and on MVSA-Multi.
PAPER_MVSA = (("MultiSentiNet-Att", 0.69, 0.69, 0.68, 0.68), ("Dual-Pipeline", 0.57, 0.56, 0.73, 0.69),
              ("BERT+DINOv2 basic", 0.73, 0.71, 0.68, 0.67), ("BERT+DINOv2 self-attention", 0.72, 0.70, 0.68, 0.67),
              ("BERT+DINOv2 dual-attention", 0.72, 0.71, 0.67, 0.66))
ANCHOR_MVSA = (("MultiSentiNet", 0.6984, 0.6963, 0.6886, 0.6811), ("BERT, text only", 0.7111, 0.6970, 0.6759, 0.6624),
               ("MGNNS", 0.7377, 0.7270, 0.7249, 0.6934), ("CLMLF", 0.7533, 0.7346, 0.7200, 0.6983),
               ("DTN", 0.7711, 0.7646, 0.7272, 0.7272))
PAPER, ANCHOR = "BERT-DINOv2 paper, Tables 1-2", "published anchor (shared/DATASETS.md)"


def _mvsa(column: int) -> tuple[Published, ...]:
    return tuple(Published(row[0], row[column], row[column + 1], None, source, digits)
                 for rows, source, digits in ((PAPER_MVSA, PAPER, 2), (ANCHOR_MVSA, ANCHOR, 4)) for row in rows)


PUBLISHED: dict[str, tuple[Published, ...]] = {
    "mvsa-single": _mvsa(1),
    "mvsa-multi": _mvsa(3),
    "memotion": (Published("BERT+DINOv2 dual-attention", None, None, 0.3552, "BERT-DINOv2 paper", 4),
                 Published("SemEval-2020 Task 8 baseline", None, None, 0.2176, "SemEval-2020 Task 8", 4)),
}


@dataclass(frozen=True)
class Report:
    markdown: Path
    figures: list[Path]


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]

def _field(data: Any, dotted: str, path: Path, kind: str = "number", where: str = "") -> Any:
    """data['a']['b'] for 'a.b', checked to be a number/str/non-empty list; else RunError naming file and field."""
    value = data
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    ok = {"number": isinstance(value, (int, float)) and not isinstance(value, bool), "str": isinstance(value, str),
          "list": isinstance(value, list) and len(value) > 0}[kind]
    if not ok:
        raise RunError(f"{path}: '{where}{dotted}' missing or not a {'non-empty list' if kind == 'list' else kind}")
    return value


def _check_block(block: Any, path: Path, where: str, *, confusion: bool = False) -> None:
    for name in METRICS:
        _field(block, name, path, where=where)
    for name in LABELS:
        _field(block, f"per_class_f1.{name}", path, where=where)
    if confusion:
        matrix = _field(block, "confusion_matrix", path, "list", where)
        if len(matrix) != 3 or any(not isinstance(r, list) or len(r) != 3 for r in matrix) or not all(
                isinstance(v, (int, float)) for r in matrix for v in r):
            raise RunError(f"{path}: '{where}confusion_matrix' is not a 3x3 list of counts")


def read_run_record(run_dir: Path) -> Run:
    """The JSON half of a run directory (config.json, metrics.json; not the weights, which heads.checkpoint.load_run
    loads), checked for every field the report draws."""
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.json"
    metrics = read_json(metrics_path)
    config = read_json(config_path)
    for dotted in ("head", *CACHE_FIELDS):
        _field(config, dotted, config_path, "str")
    _check_block(metrics.get("val"), metrics_path, "val.")
    _check_block(metrics.get("test"), metrics_path, "test.", confusion=True)
    _field(metrics, "best_epoch", metrics_path)
    for index, entry in enumerate(_field(metrics, "history", metrics_path, "list")):
        for dotted in ("epoch", *(f"per_class_f1.{name}" for name in LABELS)):
            _field(entry, dotted, metrics_path, where=f"history[{index}].")
    return Run(run_dir, config, metrics)


def _load_grid(grid_dir: Path) -> dict[str, Any]:
    path = grid_dir / "results.json"
    results = read_json(path)
    metric = _field(results, "metric", path, "str")
    if metric not in METRICS:
        raise RunError(f"{path}: 'metric' is {metric!r}, expected one of {', '.join(METRICS)}")
    fields = [("config.head", "str"), ("config.lr", "number"), ("config.dropout", "number"),
              (f"val.{metric}", "number")] + [(f"test.{name}", "number") for name in METRICS]
    for dotted in CACHE_FIELDS:
        _field(results, dotted, path, "str")
    for index, row in enumerate(_field(results, "rows", path, "list")):
        for dotted, kind in fields:
            _field(row, dotted, path, kind, f"rows[{index}].")
    return results


def _new_figure(width: float, height: float):
    """A figure on its own Agg canvas: no pyplot, so no global backend or figure registry is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise FusionError("fusion report needs matplotlib: pip install 'fusion[report]'") from None
    return FigureCanvasAgg(Figure(figsize=(width, height), dpi=110, layout="constrained")).figure


def _save(figure, path: Path) -> Path:
    # No 'Software' stamp: the same data gives the same bytes.
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", metadata={"Software": None}))
    return path


def plot_per_class_f1(history: list[dict], best_epoch: float, path: Path) -> Path:
    """The paper's Figure 3: does each class, the minority ones too, get learned epoch by epoch?"""
    figure = _new_figure(7.4, 4.0)
    axes = figure.add_subplot()
    epochs = [entry["epoch"] for entry in history]
    for name, colour in zip(LABELS, ("tab:red", "tab:gray", "tab:green")):
        axes.plot(epochs, [e["per_class_f1"][name] for e in history], marker="o", markersize=3, color=colour,
                  label=f"F1 {name}")
    if all(isinstance(e.get("macro_f1"), (int, float)) for e in history):
        axes.plot(epochs, [e["macro_f1"] for e in history], color="black", linestyle="--", label="macro F1")
    axes.axvline(best_epoch, color="0.3", linestyle=":", linewidth=1.5, label=f"best epoch ({best_epoch:g})")
    axes.set(xlabel="epoch", ylabel="F1 (validation)", ylim=(-0.02, 1.02), title="Per-class F1 on validation by epoch")
    axes.grid(alpha=0.3)
    # Outside the axes: inside, it hides the late epochs the figure is about.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _save(figure, path)


def plot_losses(history: list[dict], best_epoch: float, path: Path) -> Path | None:
    """Train and validation loss per epoch; None when the history records no losses."""
    series = {name: [(e["epoch"], e[name]) for e in history if isinstance(e.get(name), (int, float))]
              for name in ("train_loss", "val_loss")}
    if not any(series.values()):
        return None
    figure = _new_figure(6.4, 4.0)
    axes = figure.add_subplot()
    for name, points in series.items():
        if points:
            axes.plot(*zip(*points), marker="o", markersize=3, label=name.replace("_", " "))
    axes.axvline(best_epoch, color="0.3", linestyle=":", linewidth=1.5, label=f"best epoch ({best_epoch:g})")
    axes.set(xlabel="epoch", ylabel="loss", title="Training and validation loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_confusion(matrix: list[list[float]], path: Path, title: str) -> Path:
    """Counts with row percentages: the row share shows recall even when the classes are unbalanced."""
    figure = _new_figure(4.8, 4.2)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    largest = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        for j, count in enumerate(row):
            axes.text(j, i, f"{count:g}\n({100 * count / total:.0f}%)", ha="center", va="center",
                      color="white" if count > largest / 2 else "black")
    axes.set_xticks(range(3), LABELS)
    axes.set_yticks(range(3), LABELS)
    axes.set(xlabel="predicted", ylabel="true", title=title)
    figure.colorbar(image, ax=axes, shrink=0.8, label="count")
    return _save(figure, path)


def plot_grid(cells: dict[str, dict[tuple[float, float], float]], metric: str, path: Path) -> Path:
    """One heatmap per head over learning rate x dropout, on a shared colour scale so heads compare at a glance."""
    lrs = sorted({lr for head in cells.values() for lr, _ in head})
    dropouts = sorted({d for head in cells.values() for _, d in head})
    values = [v for head in cells.values() for v in head.values()]
    rows, columns = math.ceil(len(cells) / 3), min(3, len(cells))
    figure = _new_figure(1.2 + 1.2 * len(dropouts) * columns, 0.9 + 0.6 * len(lrs) * rows + 0.4)
    panels = figure.subplots(rows, columns, squeeze=False)
    for axes, head in zip(panels.flat, sorted(cells)):
        grid = [[cells[head].get((lr, d), math.nan) for d in dropouts] for lr in lrs]
        image = axes.imshow(grid, cmap="viridis", vmin=min(values), vmax=max(values), aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                axes.text(j, i, "-" if math.isnan(value) else f"{value:.3f}", ha="center", va="center",
                          color="white" if value < (min(values) + max(values)) / 2 else "black", fontsize="small")
        axes.set_xticks(range(len(dropouts)), [f"{d:g}" for d in dropouts])
        axes.set_yticks(range(len(lrs)), [f"{lr:.1e}".replace(".0e", "e") for lr in lrs])
        axes.set(xlabel="dropout", ylabel="learning rate", title=head)
    for axes in list(panels.flat)[len(cells):]:
        axes.set_axis_off()
    figure.colorbar(image, ax=panels, shrink=0.8, label=f"validation {METRIC_NAMES[metric]}")
    figure.suptitle(f"Validation {METRIC_NAMES[metric]}: best over losses, mean over seeds")
    return _save(figure, path)


def _run_figures(run: Run) -> list[Path]:
    history, best = run.metrics["history"], run.metrics["best_epoch"]
    test = run.metrics["test"]["confusion_matrix"]
    figures = [plot_per_class_f1(history, best, run.path / "f1_per_class.png"),
               plot_losses(history, best, run.path / "losses.png"),
               plot_confusion(test, run.path / "confusion_test.png",
                              f"Confusion matrix, test (n={sum(map(sum, test)):g})")]
    return [figure for figure in figures if figure is not None]


def grid_cells(summaries: list[Summary]) -> dict[str, dict[tuple[float, float], float]]:
    """head -> (lr, dropout) -> the best, over losses and other settings, of the seed-mean validation metric."""
    cells: dict[str, dict[tuple[float, float], float]] = {}
    for summary in summaries:
        config = summary.config
        head = cells.setdefault(config["head"], {})
        key = (float(config["lr"]), float(config["dropout"]))
        head[key] = max(head.get(key, -math.inf), summary.val_mean)
    return cells


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def is_paper_encoder(name: str, hub_id: str) -> bool:
    """Matches a hub id, a local copy named after it, or a hub-cache snapshot path; '@revision' is ignored."""
    name = name.split("@")[0].rstrip("/")
    return (name == hub_id or Path(name).name == hub_id.split("/")[-1]
            or f"models--{hub_id.replace('/', '--')}" in name)


def _encoder_lines(cache: dict[str, Any]) -> list[str]:
    text, image, paper = cache["text_model"], cache["image_model"], f"({PAPER_TEXT_MODEL} + {PAPER_IMAGE_MODEL})"
    same = is_paper_encoder(text, PAPER_TEXT_MODEL) and is_paper_encoder(image, PAPER_IMAGE_MODEL)
    return [f"- Cache: `{cache.get('path', '?')}` (dataset `{cache['dataset']}`, "
            f"fingerprint `{str(cache.get('fingerprint', '?'))[:12]}`)", f"- Encoders: text `{text}`, image `{image}`.",
            f"- These are the paper's encoders {paper}." if same else f"- **These are not the paper's encoders** "
            f"{paper}: any comparison with published numbers is not like for like.", ""]


def _published_lines(dataset: str, label: str, test: dict[str, Any]) -> list[str]:
    published = PUBLISHED.get(dataset)
    if not published:
        return [f"No published numbers are known for dataset `{dataset}`.", ""]
    rows = [[f"**{label}**"] + [_fmt(test[m]) for m in METRICS] + ["this report (test split)"]]
    rows += [[p.model] + [_fmt(getattr(p, m), p.digits) for m in METRICS] + [p.source] for p in published]
    note = "Published numbers come from their authors' splits, which may differ from this cache's; '-' = not published."
    return _table(["model", "accuracy", "weighted F1", "macro F1", "source"], rows) + [note, ""]


def _results_lines(metrics: dict[str, Any]) -> list[str]:
    rows = [[split] + [_fmt(metrics[split][m]) for m in METRICS]
            + [_fmt(metrics[split]["per_class_f1"][name]) for name in LABELS] for split in ("val", "test")]
    return _table(["split", "accuracy", "weighted F1", "macro F1"] + [f"F1 {name}" for name in LABELS], rows)


BATCH_NOTE = ("`batch_size` is our choice where the paper is silent (it gives no batch size); README, \"The batch "
              "size\", says how it was chosen.")
FIGURE_TITLES = {"f1_per_class.png": "Per-class F1 on validation by epoch (best epoch marked)",
                 "losses.png": "Training and validation loss", "confusion_test.png": "Confusion matrix on test",
                 "grid_heatmap.png": "Validation metric over learning rate x dropout, per head"}


def _figure_lines(figures: list[Path], base: Path) -> list[str]:
    return [line for figure in figures for line in
            (f"![{FIGURE_TITLES.get(figure.name, figure.stem)}]({Path(os.path.relpath(figure, base)).as_posix()})", "")]


def _run_lines(run: Run, figures: list[Path], base: Path, label: str, level: str = "##") -> list[str]:
    settings = [[key, f"`{value}`"] for key, value in run.config.items() if not isinstance(value, dict)]
    epochs = run.metrics.get("epochs_run", len(run.metrics["history"]))
    lines = [f"Best epoch {_fmt(run.metrics['best_epoch'])} of {epochs} run.", "", f"{level} Configuration", ""]
    lines += _table(["setting", "value"], settings) + [BATCH_NOTE, "", f"{level} Cache and encoders", ""]
    lines += _encoder_lines(run.config["cache"]) + [f"{level} Results", ""] + _results_lines(run.metrics)
    lines += [f"{level} Beside the published numbers (test)", ""]
    lines += _published_lines(run.config["cache"]["dataset"], label, run.metrics["test"])
    return lines + [f"{level} Figures", ""] + _figure_lines(figures, base)


def _best_head_lines(summaries: list[Summary], metric: str) -> list[str]:
    rows = []
    for head, best in sorted(best_per_head(summaries).items()):
        config = best.config
        spread = f" ± {best.val_std:.4f}" if len(best.seeds) > 1 else ""
        rows.append([head, f"{config['lr']:g}", f"{config['dropout']:g}", loss_label(config["loss"], config["gamma"]),
                     str(len(best.seeds)), f"{best.val_mean:.4f}{spread}"] + [f"{best.test[m]:.4f}" for m in METRICS])
    header = ["head", "lr", "dropout", "loss", "seeds", f"val {METRIC_NAMES[metric]} (mean ± sd)",
              "test accuracy", "test weighted F1", "test macro F1"]
    return _table(header, rows)


def _write_text(path: Path, lines: list[str]) -> Path:
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path


def _write_grid_report(grid_dir: Path) -> Report:
    results = _load_grid(grid_dir)
    metric, best_dir = results["metric"], grid_dir / "best"
    if not (best_dir / "metrics.json").is_file():
        raise RunError(f"{best_dir / 'metrics.json'}: missing (the grid's best run)")
    best_figures = write_report(best_dir).figures
    best = read_run_record(best_dir)
    summaries = summarise(results["rows"], metric)
    heatmap = plot_grid(grid_cells(summaries), metric, grid_dir / "grid_heatmap.png")
    seeds = len({row["config"].get("seed") for row in results["rows"]})
    lines = [f"# Grid report: {results['cache']['dataset']}", "",
             f"{len(results['rows'])} runs ({len(summaries)} settings x up to {seeds} seeds), "
             f"selected by validation {METRIC_NAMES[metric]}.", ""]
    lines += _encoder_lines(results["cache"]) + ["## Validation metric over learning rate x dropout", ""]
    lines += _figure_lines([heatmap], grid_dir) + ["## Best configuration per head", ""]
    lines += _best_head_lines(summaries, metric) + [f"## Best run (`best/`, head {best.config['head']})", ""]
    lines += _run_lines(best, best_figures, grid_dir, f"grid best ({best.config['head']})", "###")
    return Report(_write_text(grid_dir / "report.md", lines), [heatmap] + best_figures)


def write_report(run_dir: Path) -> Report:
    """Figures and report.md for a run directory, or for a grid directory (one with results.json)."""
    run_dir = Path(run_dir)
    if (run_dir / "results.json").is_file():
        return _write_grid_report(run_dir)
    run = read_run_record(run_dir)
    figures = _run_figures(run)
    title = f"# Run report: {run.config['head']} on {run.config['cache']['dataset']}"
    lines = [title, ""] + _run_lines(run, figures, run_dir, f"this run ({run.config['head']})")
    return Report(_write_text(run_dir / "report.md", lines), figures)
