"""Reports for a run directory (`fusion fit`) or a grid directory (`fusion grid`): PNG figures and report.md.

    report = write_report(Path("runs/fit"))   # Report(markdown=runs/fit/report.md, figures=[...png])

A run directory holds config.json and metrics.json (and test_predictions.json, from which test metrics get 95%
bootstrap intervals over the test rows: app/reporting/stats.py); a grid directory holds results.json (with the
hierarchical bootstrap intervals and Holm-corrected paired comparisons that `fusion grid` computed,
app/reporting/uncertainty.py) and best/ (a run directory). Test
metrics are shown beside the published numbers (app/reporting/published.py) for memotion, mvsa-single and mvsa-multi,
with the split they were measured on. matplotlib is imported inside the functions only, so the rest of fusion works
without it.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.app.handles import CACHE_FIELDS, Run, json_field
from fusion.app.reporting import markdown
from fusion.app.reporting.calibration import calibration_figure, calibration_lines
from fusion.app.reporting.duplicates import duplicate_lines
from fusion.app.reporting.figures import new_figure, save_png  # noqa: F401 - reproduction.py draws with them too
from fusion.app.reporting.published import PUBLISHED, like_for_like, split_lines, split_note
from fusion.app.reporting.readings import readings_lines
from fusion.app.reporting.stats import RESAMPLES, Interval, metric_ci
from fusion.atomic import write_text_atomic
from fusion.errors import RunError
from fusion.heads.checkpoint import PREDICTIONS_FILE, read_json
from fusion.heads.config import loss_label
from fusion.heads.search.summary import Summary, best_per_head, still_improving, summarise, val_loss_falling
from fusion.heads.registry import pooled_dual_attn_note
from fusion.labels import LABELS
from fusion.paper import IMAGE_MODEL, METRICS, TEXT_MODEL, metric_title



@dataclass(frozen=True)
class Report:
    markdown: Path
    figures: list[Path]


def _load_grid(grid_dir: Path) -> dict[str, Any]:
    path = grid_dir / "results.json"
    results = read_json(path)
    metric = json_field(results, "metric", path, "str")
    if metric not in METRICS:
        raise RunError(f"{path}: 'metric' is {metric!r}, expected one of {', '.join(METRICS)}")
    fields = [("config.head", "str"), ("config.lr", "number"), ("config.dropout", "number"),
              (f"val.{metric}", "number")] + [(f"test.{name}", "number") for name in METRICS]
    for dotted in CACHE_FIELDS:
        json_field(results, dotted, path, "str")
    for index, row in enumerate(json_field(results, "rows", path, "list")):
        for dotted, kind in fields:
            json_field(row, dotted, path, kind, f"rows[{index}].")
    return results


def plot_per_class_f1(history: list[dict], best_epoch: float, path: Path) -> Path:
    """The paper's Figure 3: does each class, the minority ones too, get learned epoch by epoch?"""
    figure = new_figure(7.4, 4.0)
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
    return save_png(figure, path)


def plot_losses(history: list[dict], best_epoch: float, path: Path) -> Path | None:
    """Train and validation loss per epoch; None when the history records no losses."""
    series = {name: [(e["epoch"], e[name]) for e in history if isinstance(e.get(name), (int, float))]
              for name in ("train_loss", "val_loss")}
    if not any(series.values()):
        return None
    figure = new_figure(6.4, 4.0)
    axes = figure.add_subplot()
    for name, points in series.items():
        if points:
            axes.plot(*zip(*points), marker="o", markersize=3, label=name.replace("_", " "))
    axes.axvline(best_epoch, color="0.3", linestyle=":", linewidth=1.5, label=f"best epoch ({best_epoch:g})")
    axes.set(xlabel="epoch", ylabel="loss", title="Training and validation loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return save_png(figure, path)


def plot_confusion(matrix: list[list[float]], path: Path, title: str) -> Path:
    """Counts with row percentages: the row share shows recall even when the classes are unbalanced."""
    figure = new_figure(4.8, 4.2)
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
    return save_png(figure, path)


def plot_grid(cells: dict[str, dict[tuple[float, float], float]], metric: str, path: Path) -> Path:
    """One heatmap per head over learning rate x dropout, on a shared colour scale so heads compare at a glance."""
    lrs = sorted({lr for head in cells.values() for lr, _ in head})
    dropouts = sorted({d for head in cells.values() for _, d in head})
    values = [v for head in cells.values() for v in head.values()]
    rows, columns = math.ceil(len(cells) / 3), min(3, len(cells))
    figure = new_figure(1.2 + 1.2 * len(dropouts) * columns, 0.9 + 0.6 * len(lrs) * rows + 0.4)
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
    figure.colorbar(image, ax=panels, shrink=0.8, label=f"validation {metric_title(metric)}")
    figure.suptitle(f"Validation {metric_title(metric)}: best over losses, mean over seeds")
    return save_png(figure, path)


def _run_figures(run: Run) -> list[Path]:
    history, best = run.metrics["history"], run.metrics["best_epoch"]
    test = run.metrics["test"]["confusion_matrix"]
    figures = [plot_per_class_f1(history, best, run.path / "f1_per_class.png"),
               plot_losses(history, best, run.path / "losses.png"),
               plot_confusion(test, run.path / "confusion_test.png",
                              f"Confusion matrix, test (n={sum(map(sum, test)):g})"),
               calibration_figure(run)]
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




def is_paper_encoder(name: str, hub_id: str) -> bool:
    """Matches a hub id, a local copy named after it, or a hub-cache snapshot path; '@revision' is ignored."""
    name = name.split("@")[0].rstrip("/")
    return (name == hub_id or Path(name).name == hub_id.split("/")[-1]
            or f"models--{hub_id.replace('/', '--')}" in name)


def _encoder_lines(cache: dict[str, Any]) -> list[str]:
    text, image, paper = cache["text_model"], cache["image_model"], f"({TEXT_MODEL} + {IMAGE_MODEL})"
    same = is_paper_encoder(text, TEXT_MODEL) and is_paper_encoder(image, IMAGE_MODEL)
    return ([f"- Cache: `{cache.get('path', '?')}` (dataset `{cache['dataset']}`, "
            f"fingerprint `{str(cache.get('fingerprint', '?'))[:12]}`)", f"- Encoders: text `{text}`, image `{image}`.",
            f"- These are the paper's encoders {paper}." if same else f"- **These are not the paper's encoders** "
            f"{paper}: any comparison with published numbers is not like for like."] + split_lines(cache)
            + duplicate_lines(cache) + [""])


def with_interval(value: float, interval: Interval | None) -> str:
    return markdown.number(value) + ("" if interval is None else f" [{interval.low:.4f}, {interval.high:.4f}]")


def _published_lines(cache: dict[str, Any], label: str, test: dict[str, Any],
                     intervals: dict[str, Interval] | None) -> list[str]:
    dataset = cache["dataset"]
    published = PUBLISHED.get(dataset)
    if not published:
        return [f"No published numbers are known for dataset `{dataset}`.", ""]
    ours = [with_interval(test[m], (intervals or {}).get(m)) for m in METRICS]
    rows = [[f"**{label}**"] + ours[:2] + ["F1 (weighted)"] + ours[2:]
            + ["yes", "this report (test split" + (", 95% CI)" if intervals else ")")]]
    rows += [[p.model] + [markdown.number(p.value(m), p.digits) for m in METRICS[:2]]
             + [p.f1_label if p.f1_kind else "-", markdown.number(p.macro_f1, p.digits),
                "yes" if like_for_like(p, cache) else "no", p.source] for p in published]
    notes = [split_note(cache), "'-' = not published. Published F1 sits in the weighted F1 column; 'which F1' says "
             "what each source reports (the seed paper's Table 1 does not say)."]
    header = ["model", "accuracy", "weighted F1", "which F1", "macro F1", "same split", "source"]
    return markdown.table(header, rows) + notes + [""]


def _results_lines(metrics: dict[str, Any], intervals: dict[str, Interval] | None) -> list[str]:
    rows = [[split] + [markdown.number(metrics[split][m]) for m in METRICS]
            + [markdown.number(metrics[split]["per_class_f1"][name]) for name in LABELS] for split in ("val", "test")]
    if intervals:
        rows.append(["test, 95% CI"] + [f"[{intervals[m].low:.4f}, {intervals[m].high:.4f}]" for m in METRICS]
                    + ["-"] * len(LABELS))
    lines = markdown.table(["split", "accuracy", "weighted F1", "macro F1"] + [f"F1 {name}" for name in LABELS], rows)
    if intervals:
        lines += [f"95% confidence intervals: {BOOTSTRAP_NOTE}", ""]
    return lines


BOOTSTRAP_NOTE = ("bootstrap over the test rows (2,000 resamples, seed 0, BCa; scipy.stats.bootstrap), from "
                  f"{PREDICTIONS_FILE}. A run has one seed, so only the test rows are resampled; a grid's intervals "
                  "also resample its seeds.")


def interval_note(resamples: int) -> str:
    """What a grid's (or a reproduction's) test interval is."""
    return (f"95% CI of the seed mean: hierarchical bootstrap, {resamples:,} resamples, seed 0, BCa "
            "(scipy.stats.bootstrap). Each resample draws the seeds with replacement, then the test rows, and scores "
            "every drawn seed on those rows, so the interval holds both the seed-to-seed spread and the test set's "
            "noise")


def run_intervals(run_dir: Path) -> dict[str, Interval] | None:
    """95% bootstrap intervals of the run's test metrics, from test_predictions.json; None when it has none (runs
    written before test predictions were kept)."""
    path = run_dir / PREDICTIONS_FILE
    if not path.is_file():
        return None
    predictions = read_json(path)
    y_true, y_pred = (json_field(predictions, key, path, "list") for key in ("y_true", "y_pred"))
    if len(y_true) != len(y_pred) or not all(isinstance(v, int) and 0 <= v <= 2 for v in (*y_true, *y_pred)):
        raise RunError(f"{path}: 'y_true' and 'y_pred' must be equally long lists of class ids 0..2")
    return {name: metric_ci(y_true, y_pred, name) for name in METRICS}


BATCH_NOTE = ("`batch_size` is our choice where the paper is silent (it gives no batch size); docs/training.md, "
              "\"The batch size\", says how it was chosen.")
FIGURE_TITLES = {"f1_per_class.png": "Per-class F1 on validation by epoch (best epoch marked)",
                 "losses.png": "Training and validation loss", "confusion_test.png": "Confusion matrix on test",
                 "grid_heatmap.png": "Validation metric over learning rate x dropout, per head",
                 "reliability_test.png": "Reliability diagram on test, before and after the temperature"}


def _figure_lines(figures: list[Path], base: Path) -> list[str]:
    return [line for figure in figures for line in
            (f"![{FIGURE_TITLES.get(figure.name, figure.stem)}]({Path(os.path.relpath(figure, base)).as_posix()})", "")]


def _run_lines(run: Run, figures: list[Path], base: Path, label: str, level: str = "##") -> list[str]:
    intervals = run_intervals(run.path)
    settings = [[key, f"`{value}`"] for key, value in run.config.items() if not isinstance(value, dict)]
    epochs = run.metrics.get("epochs_run", len(run.metrics["history"]))
    row = {"config": run.config, "best_epoch": run.metrics["best_epoch"], "epochs_run": epochs}
    improving = (f" **Still improving at {epochs} epochs**: the best validation score came in the last epoch the "
                 "cap allowed." if still_improving(row) else "")
    if val_loss_falling(run.metrics["history"]):
        improving += (" **Validation loss still falling**: it was lowest in the last epoch, so training stopped "
                      "while the head still fitted.")
    lines = [f"Best epoch {markdown.number(run.metrics['best_epoch'])} of {epochs} run.{improving}", "",
             f"{level} Configuration", ""]
    lines += markdown.table(["setting", "value"], settings) + [BATCH_NOTE, "", f"{level} Cache and encoders", ""]
    lines += _encoder_lines(run.config["cache"]) + [f"{level} Results", ""] + _results_lines(run.metrics, intervals)
    lines += [f"{level} Beside the published numbers (test)", ""]
    lines += _published_lines(run.config["cache"], label, run.metrics["test"], intervals)
    lines += [f"{level} Calibration (test)", ""] + calibration_lines(run)
    return lines + [f"{level} Figures", ""] + _figure_lines(figures, base)


def _best_head_lines(summaries: list[Summary], metric: str, uncertainty: dict | None) -> list[str]:
    rows = []
    for head, best in sorted(best_per_head(summaries).items()):
        config = best.config
        spread = f" ± {best.val_std:.4f}" if len(best.seeds) > 1 else ""
        intervals = (uncertainty or {}).get("heads", {}).get(head, {}).get("test")
        rows.append([head, f"{config['lr']:g}", f"{config['dropout']:g}", loss_label(config["loss"], config["gamma"]),
                     str(len(best.seeds)), f"{best.val_mean:.4f}{spread}"]
                    + [test_cell(best.test[m], best.test_std[m], len(best.seeds), (intervals or {}).get(m))
                       for m in METRICS] + [improving_cell(best)])
    header = ["head", "lr", "dropout", "loss", "seeds", f"val {metric_title(metric)} (mean ± sd)",
              "test accuracy", "test weighted F1", "test macro F1", "under-training"]
    note = [f"Test cells: mean ± sd over seeds [{interval_note((uncertainty or {}).get('resamples', RESAMPLES))}].",
            ""]
    return markdown.table(header, rows) + (note if uncertainty else [])


def improving_cell(best: Summary) -> str:
    """Under-training of a configuration's seeds: stopped by the epoch cap still improving, or with the validation
    loss still falling (heads/search/summary.py); '–' when neither."""
    seeds = len(best.seeds)
    parts = [f"still improving at {best.config.get('epochs')} epochs ({best.still_improving} of {seeds} seeds)"
             if best.still_improving else "",
             f"val loss still falling ({best.loss_falling} of {seeds} seeds)" if best.loss_falling else ""]
    return "; ".join(part for part in parts if part) or "–"


def undertraining_line(rows: list[dict]) -> str:
    """How many runs the epoch cap stopped while their validation metric still improved, and how many stopped
    (patience or the cap) while their validation loss still fell, each by learning rate."""
    caps = ", ".join(str(cap) for cap in sorted({row["config"].get("epochs") for row in rows} - {None})) or "?"
    count, by_lr = _by_lr(rows, still_improving)
    line = (f"Under-training: {count} runs reached the epoch cap ({caps} epochs) with their best validation score in "
            f"their last epoch ({by_lr})")
    known = [row for row in rows if "val_loss_falling" in row]  # rows logged before the flag cannot tell
    if known:
        count, by_lr = _by_lr(known, lambda row: row["val_loss_falling"] is True)
        line += (f"; {count} stopped, by patience on the validation metric or by the cap, with their lowest "
                 f"validation loss in their last epoch ({by_lr})")
    return line + ". More epochs might have helped them."


def _by_lr(rows: list[dict], flag) -> tuple[str, str]:
    """('k of n', 'lr 0.001: a of b, ...') of the rows `flag` marks."""
    flagged = Counter(row["config"]["lr"] for row in rows if flag(row))
    total = Counter(row["config"]["lr"] for row in rows)
    return (f"{sum(flagged.values())} of {len(rows)}",
            ", ".join(f"lr {lr:g}: {flagged[lr]} of {total[lr]}" for lr in sorted(total, reverse=True)))


def test_cell(mean: float, sd: float, seeds: int, interval: dict | None) -> str:
    """'mean ± sd [low, high]': the spread over seeds and the hierarchical bootstrap interval of the seed mean."""
    text = f"{mean:.4f}" + (f" ± {sd:.4f}" if seeds > 1 else "")
    return text + (f" [{interval['low']:.4f}, {interval['high']:.4f}]" if interval else "")


def comparison_lines(uncertainty: dict | None) -> list[str]:
    """The best fusion head minus each other head on the same test rows: the paired hierarchical bootstrap interval,
    p before and after Holm's correction, and whether the difference is significant (both must say so)."""
    if not uncertainty or not uncertainty.get("comparisons"):
        return ["No paired comparison: the grid has no test predictions, or no other head to compare with.", ""]
    metric = metric_title(uncertainty["metric"])
    rows = [[f"{c['a']} − {c['b']}", f"{c['difference']:+.4f}", f"[{c['low']:+.4f}, {c['high']:+.4f}]",
             "yes" if c["excludes_zero"] else "no", _p(c.get("p_value")), _p(c.get("p_holm")),
             _significant(c)] for c in uncertainty["comparisons"]]
    header = ["comparison", f"test {metric} difference", "95% CI (hierarchical)", "CI excludes 0", "p", "p (Holm)",
              "significant"]
    note = (f"{uncertainty['best_fusion_head']} is the fusion head with the best validation score. Each of the "
            f"{uncertainty['resamples']:,} resamples draws each head's seeds with replacement, then "
            f"{uncertainty['test_rows']} test rows with replacement, and scores every drawn seed of both heads on "
            "those rows; an interval that holds 0 means the difference is within the noise of the seeds and the test "
            f"set. p is the bootstrap's two-sided p-value; p (Holm) corrects it across these "
            f"{len(uncertainty['comparisons'])} comparisons. A difference is significant only when its interval "
            "excludes 0 and p (Holm) <= 0.05.")
    return markdown.table(header, rows) + [note, ""]


def _p(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _significant(comparison: dict) -> str:
    """'yes'/'no'; '-' for a comparison stored before Holm's correction was kept (no p-values to judge by)."""
    return "-" if "significant" not in comparison else ("yes" if comparison["significant"] else "no")


def _readings(report_dir: Path, config: dict[str, Any], heads: list[str]) -> list[str]:
    """The "How we read the paper" block with the values `config` (a run's, or a grid's best) trained with."""
    dual = ("tokens" if config.get("tokens") is True else "pooled") if "dual_attn" in heads else None
    return readings_lines(report_dir, batch_size=config.get("batch_size", "?"),
                          max_length=(config.get("cache") or {}).get("max_length"), epochs=config.get("epochs", "?"),
                          patience=config.get("patience", "?"), hidden=config.get("hidden", 256), dual_attn=dual)


def _pooled_note_lines(heads: list[str], run_config: dict[str, Any]) -> list[str]:
    """The single-key note when dual_attn ran on pooled features (a run's config.json records "tokens"; runs written
    before that key were all pooled)."""
    note = pooled_dual_attn_note(heads, tokens=run_config.get("tokens") is True)
    return [f"Note: {note}.", ""] if note else []


def _write_text(path: Path, lines: list[str]) -> Path:
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path


def _write_grid_report(grid_dir: Path) -> Report:
    results = _load_grid(grid_dir)
    metric, best_dir = results["metric"], grid_dir / "best"
    if not (best_dir / "metrics.json").is_file():
        raise RunError(f"{best_dir / 'metrics.json'}: missing (the grid's best run)")
    best_figures = write_report(best_dir).figures
    best = Run.read(best_dir)
    summaries = summarise(results["rows"], metric)
    heatmap = plot_grid(grid_cells(summaries), metric, grid_dir / "grid_heatmap.png")
    seeds = len({row["config"].get("seed") for row in results["rows"]})
    heads = [row["config"]["head"] for row in results["rows"]]
    lines = [f"# Grid report: {results['cache']['dataset']}", ""] + _readings(grid_dir, best.config, heads)
    lines += [f"{len(results['rows'])} runs ({len(summaries)} settings x up to {seeds} seeds), "
              f"selected by validation {metric_title(metric)}.", "", undertraining_line(results["rows"]), ""]
    lines += _pooled_note_lines(heads, best.config)
    lines += _encoder_lines(results["cache"]) + ["## Validation metric over learning rate x dropout", ""]
    lines += _figure_lines([heatmap], grid_dir) + ["## Best configuration per head", ""]
    uncertainty = results.get("uncertainty")
    lines += _best_head_lines(summaries, metric, uncertainty) + ["## Paired comparisons (test)", ""]
    lines += comparison_lines(uncertainty) + [f"## Best run (`best/`, head {best.config['head']})", ""]
    lines += _run_lines(best, best_figures, grid_dir, f"grid best ({best.config['head']})", "###")
    return Report(_write_text(grid_dir / "report.md", lines), [heatmap] + best_figures)


def write_report(run_dir: Path) -> Report:
    """Figures and report.md for a run directory, or for a grid directory (one with results.json)."""
    run_dir = Path(run_dir)
    if (run_dir / "results.json").is_file():
        return _write_grid_report(run_dir)
    run = Run.read(run_dir)
    figures = _run_figures(run)
    title = f"# Run report: {run.config['head']} on {run.config['cache']['dataset']}"
    lines = [title, ""] + _readings(run_dir, run.config, [run.config["head"]])
    lines += _pooled_note_lines([run.config["head"]], run.config)
    lines += _run_lines(run, figures, run_dir, f"this run ({run.config['head']})")
    return Report(_write_text(run_dir / "report.md", lines), figures)
