"""What `fusion grid` leaves behind: results.csv and results.json, one row per configuration and seed."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from fusion.atomic import write_text_atomic
from fusion.labels import LABELS
from fusion.paper import METRICS

CONFIG_COLUMNS = ("head", "lr", "dropout", "loss", "gamma", "seed", "batch_size", "epochs", "patience", "metric",
                  "precision")


def csv_row(row: dict) -> dict:
    config = row["config"]
    flat = {name: config[name] for name in CONFIG_COLUMNS}
    if config["loss"] == "ce":
        flat["gamma"] = 0.0
    for block in ("val", "test"):
        for name in METRICS:
            flat[f"{block}_{name}"] = row[block][name]
        for label in LABELS:
            flat[f"{block}_f1_{label}"] = row[block]["per_class_f1"][label]
    flat.update(best_epoch=row["best_epoch"], epochs_run=row["epochs_run"], seconds=round(row["seconds"], 3),
                pruned_at=row.get("pruned_at"), still_improving=row.get("still_improving"),
                val_loss_falling=row.get("val_loss_falling"))
    return flat


def write_results(out: Path, rows: list[dict], *, metric: str, cache: dict,
                  extra: dict | None = None) -> tuple[Path, Path]:
    """Both files are rewritten whole and atomically from every row finished so far; `extra` adds top-level keys to
    results.json (the application's test labels and bootstrap intervals)."""
    table = [csv_row(row) for row in rows]
    buffer = io.StringIO()
    if table:
        writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    write_text_atomic(out / "results.csv", buffer.getvalue())
    document = {"metric": metric, "cache": cache, "rows": rows, **(extra or {})}
    write_text_atomic(out / "results.json", json.dumps(document, indent=1, sort_keys=True))
    return out / "results.csv", out / "results.json"
