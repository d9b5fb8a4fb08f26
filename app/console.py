"""Rich rendering for the CLI: progress bars and summary tables. No logic of the library lives here."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from fusion.app.reporting.duplicates import split_pairs
from fusion.heads.config import loss_label
from fusion.heads.search.summary import best_per_head
from fusion.labels import LABELS, SPLITS

console = Console()
if not console.is_terminal:
    # Piped or captured output would otherwise be cut at 80 columns, truncating the tables' numbers.
    console.width = max(console.width, 150)
errors = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, measured by Rich over the recent updates."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, unit: str):
    """Yields update(done, total); the bar shows done/total, rate and time left."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                        transient=False)
    task = progress.add_task(description, total=None)
    state = {"started": False}

    def update(done: int, total: int) -> None:
        if not state["started"]:
            # Drawn from the first report on, so an error found before any work (a wrong --root, a model that
            # will not load) is the only thing printed; that report is the resumed count, and the rate starts there.
            progress.start()
            progress.reset(task, total=total, completed=done)
            state["started"] = True
        progress.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if state["started"]:
            progress.stop()


def extract_summary_table(summary) -> Table:
    table = Table(title=f"extracted -> {summary.out}")
    table.add_column("split")
    for name in LABELS:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for split in SPLITS:
        row = summary.counts.get(split, {})
        table.add_row(split, *(str(row.get(name, 0)) for name in LABELS), str(sum(row.values())))
    return table


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    return table


def metrics_table(title: str, blocks: dict[str, dict]) -> Table:
    """Columns = blocks (val, test, ...); rows = accuracy, macro/weighted F1 and per-class F1."""
    table = Table(title=title)
    table.add_column("metric")
    for name in blocks:
        table.add_column(name, justify="right")
    rows = [("accuracy", "accuracy"), ("macro F1", "macro_f1"), ("weighted F1", "weighted_f1")]
    for label, key in rows:
        table.add_row(label, *(_fmt(block.get(key)) for block in blocks.values()))
    for name in LABELS:
        table.add_row(f"F1 {name}", *(_fmt((block.get("per_class_f1") or {}).get(name)) for block in blocks.values()))
    return table


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def cache_info_tables(info: dict) -> list[Table]:
    """`fusion cache info`: the settings, then samples per split and class, then the skipped samples by reason."""
    scalars = [(key, str(value)) for key, value in info.items() if not isinstance(value, (dict, list))]
    scalars += [(f"{key} dim", str(value)) for key, value in (info.get("dims") or {}).items()]
    counts = Table(title="samples per split and class")
    counts.add_column("split")
    for name in LABELS:
        counts.add_column(name, justify="right")
    counts.add_column("total", justify="right")
    for split, summary in (info.get("splits") or {}).items():
        per_class = summary.get("per_class", {})
        counts.add_row(split, *(str(per_class.get(name, 0)) for name in LABELS), str(summary.get("count", 0)))
    tables = [key_value_table(str(info.get("path", "cache")), scalars), counts]
    duplicates = info.get("duplicates") or {}
    if duplicates.get("pairs"):
        shared = Table(title="posts that also occur in an earlier split (normalised text, or equal pixels)")
        for column in ("splits", "same text", "same image", "either"):
            shared.add_column(column, justify="left" if column == "splits" else "right")
        for pair, n in split_pairs(duplicates):
            shared.add_row(pair, str(n["text"]), str(n["image"]), str(n["either"]))
        if duplicates.get("dedupe"):
            dropped = duplicates.get("dropped", {})
            shared.caption = f"--dedupe dropped val {dropped.get('val', 0)}, test {dropped.get('test', 0)}"
        tables.append(shared)
    skipped = info.get("skipped") or {}
    if skipped.get("count"):
        tables.append(key_value_table(f"skipped samples: {skipped['count']}",
                                      [(reason, str(n)) for reason, n in (skipped.get("reasons") or {}).items()]))
    return tables


def predictions_table(images: list, lines: list, answers: list[dict], caption: str | None = None) -> Table:
    """One row per post: where it came from (the CSV line, or the image), the label and its probabilities; with
    explanations, what the text and the image say alone and the most attended word pieces."""
    explained = any("explanation" in answer for answer in answers)
    words = any("text_attention" in answer.get("explanation", {}) for answer in answers)
    table = Table(title="predictions", caption=caption)
    table.add_column("post")
    table.add_column("label", style="bold")
    for name in LABELS:
        table.add_column(f"p({name})", justify="right")
    if explained:
        table.add_column("text alone")
        table.add_column("image alone")
    if words:
        table.add_column("most attended words")
    for image, line, answer in zip(images, lines, answers):
        where = f"line {line}: {Path(image).name}" if line else str(image)
        if "error" in answer:
            table.add_row(where, f"[red]unreadable: {answer['error']}", *[""] * (len(table.columns) - 2))
            continue
        cells = [where, answer["label"], *(f"{answer['probabilities'][name]:.3f}" for name in LABELS)]
        explanation = answer.get("explanation", {})
        if explained:
            cells += [_alone(explanation.get(key)) for key in ("text_only", "image_only")]
        if words:
            ranked = sorted(explanation.get("text_attention", []), key=lambda entry: -entry["weight"])[:3]
            cells.append(", ".join(f"{entry['token']} {entry['weight']:.2f}" for entry in ranked))
        table.add_row(*cells)
    return table


def _alone(probabilities: dict | None) -> str:
    """'positive 0.612' for a modality alone: its label and that label's probability."""
    if not probabilities:
        return "-"
    label = max(probabilities, key=probabilities.get)
    return f"{label} {probabilities[label]:.3f}"


def calibration_caption(about: dict, raw: bool) -> str:
    """What the table's probabilities are, from Predictor.describe()."""
    if raw:
        return "probabilities: the head's own softmax (--raw)"
    if about.get("temperature") is None:
        return "probabilities: uncalibrated (this run was written before fusion fitted temperatures)"
    return (f"probabilities: calibrated (temperature {about['temperature']:.3f}, fitted on validation); "
            "--raw for the head's own")


def grid_tables(summaries, metric: str, top: int = 10) -> list[Table]:
    """The top configurations and the best per head, ranked on validation; test shown beside, never used."""
    def table(title: str, rows) -> Table:
        t = Table(title=title)
        for column in ("head", "lr", "dropout", "loss", f"val {metric}", "test acc", "test wF1", "test mF1"):
            t.add_column(column, justify="right" if column not in ("head", "loss") else "left", no_wrap=True)
        for s in rows:
            c = s.config
            loss = loss_label(c["loss"], c["gamma"])
            spread = f" ± {s.val_std:.4f}" if len(s.seeds) > 1 else ""
            t.add_row(c["head"], f"{c['lr']:g}", f"{c['dropout']:g}", loss, f"{s.val_mean:.4f}{spread}",
                      f"{s.test['accuracy']:.4f}", f"{s.test['weighted_f1']:.4f}", f"{s.test['macro_f1']:.4f}")
        return t

    return [table(f"top {min(top, len(summaries))} of {len(summaries)} configurations (by val {metric})",
                  summaries[:top]),
            table("best configuration per head", best_per_head(summaries).values())]


def extract_notes(summary) -> list[str]:
    """What an extraction did beyond its counts: the split's source, skipped rows by reason, the dataset's cleaning,
    texts that were not UTF-8, and the speed."""
    lines = []
    if summary.split_source:
        lines.append(f"splits: {summary.split_source['split_source']}")
    if summary.split_counts:
        lines.append(f"split file: {summary.split_counts['ids_in_file_not_in_data']} ids not in the data, "
                     f"{summary.split_counts['rows_in_data_not_in_file']} data rows not in the file (left out)")
    reasons = Counter(reason for _, _, reason in summary.skipped)
    lines.append(f"skipped: {len(summary.skipped)}" + "".join(f"\n  {n} x {r}" for r, n in reasons.most_common()))
    if summary.cleaning:
        lines.append("dropped by the dataset's cleaning rule: " +
                     ", ".join(f"{k} {v}" for k, v in summary.cleaning.items()))
    if summary.text_fallbacks:
        lines.append("texts not in UTF-8, decoded as: " +
                     ", ".join(f"{k} {v}" for k, v in summary.text_fallbacks.items()))
    if summary.duplicates:
        lines.append(duplicates_line(summary.duplicates))
    lines.append(f"computed {summary.rows_computed} of {summary.rows_total} rows in {summary.seconds:.1f} s "
                 f"({summary.samples_per_second:.1f} samples/s)")
    return lines


def duplicates_line(record: dict) -> str:
    """'duplicates across splits: train-val 1 (text 1, image 1), ...; dropped (--dedupe): val 1, test 2'."""
    pairs = "; ".join(f"{pair} {n['either']} (text {n['text']}, image {n['image']})"
                      for pair, n in split_pairs(record))
    dropped = record.get("dropped", {})
    tail = (f"; dropped (--dedupe): val {dropped.get('val', 0)}, test {dropped.get('test', 0)}" if record.get("dedupe")
            else "; kept (--dedupe drops val/test posts that duplicate a training post)")
    return f"duplicates across splits: {pairs}{tail}"


def sweep_table(document: dict) -> Table:
    """Each cache's chosen configuration with its test interval and its difference from the leader."""
    differences = {d["b"]: d for d in document["differences"] if d["what"] == "best"}
    table = Table(title=f"encoder sweep on {document['dataset']}: chosen on val {document['metric']}, test "
                        f"{document['metric']} with {document['level']:.0%} bootstrap CI (* significant after Holm)")
    for column in ("cache", "encoders (pooling)", "head", "val", "test [CI]", f"Δ vs {document['leader']} [CI]"):
        table.add_column(column, no_wrap=column != "encoders (pooling)")
    for entry in document["caches"]:
        best, difference = entry["chosen"]["best"], differences.get(entry["name"])
        test = best["test"]
        table.add_row(entry["name"], entry["encoders"], best["config"]["head"], f"{best['val_mean']:.4f}",
                      f"{test['value']:.4f} [{test['low']:.4f}, {test['high']:.4f}]",
                      "leader" if difference is None else
                      f"{difference['difference']:+.4f} [{difference['low']:+.4f}, {difference['high']:+.4f}]"
                      + (" *" if difference.get("significant") else ""))
    return table
