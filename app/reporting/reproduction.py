"""reproduction.md and its figures: `fusion reproduce`'s heads and ablations, per dataset, beside the published numbers.

reproduction.md opens with how we read the paper (app/reporting/readings.py, docs/paper.md). Per dataset: the split
(a split file with its sha256 prefix and the ids it and the data do not share) and the posts shared across splits;
our heads (the best configuration of each on validation, every seed) with test accuracy, weighted F1 and macro F1 as
mean ± sd over seeds and a 95% hierarchical bootstrap interval (seeds, then test rows), and how many seeds were
under-trained (stopped by the epoch cap still improving, or with their validation loss still falling); the same
beside the seed paper's Tables 1 and 2 and later work, each row saying which F1 it reports and whether it was
measured on this run's split; the best fusion head against each ablation and each other head by a paired
hierarchical bootstrap, Holm-corrected; one figure. dual_attn is always named by the features it ran on:
"dual_attn (single-key, pooled)", where one key per modality makes its attention a linear map (the report carries
heads/registry.py's note), and, with `--tokens`, "dual_attn (token attention)".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fusion.app.reporting import markdown
from fusion.app.reporting.calibration import ECE_NOTE, ece_cell, seed_mean_ece
from fusion.app.reporting.duplicates import duplicate_lines
from fusion.app.reporting.published import Published, like_for_like, published_for, split_lines, split_note
from fusion.app.reporting.readings import readings_lines
from fusion.app.reporting.report import (comparison_lines, improving_cell, interval_note, is_paper_encoder, new_figure,
                                         save_png, test_cell, undertraining_line)
from fusion.atomic import write_text_atomic
from fusion.heads.config import loss_label
from fusion.heads.registry import pooled_dual_attn_note
from fusion.heads.search.summary import best_per_head, summarise
from fusion.paper import DATASETS, IMAGE_MODEL, METRICS, TEXT_MODEL, metric_title

if TYPE_CHECKING:  # the command body (app/reproduce.py) makes what this module writes
    from fusion.app.reproduce import DatasetResult, Reproduction

TOKEN_LABEL, POOLED_LABEL = "dual_attn (token attention)", "dual_attn (single-key, pooled)"
ORDER = ("basic", "self_attn", TOKEN_LABEL, POOLED_LABEL, "text_only", "image_only")
SHORT = {TOKEN_LABEL: "dual_attn\n(tokens)", POOLED_LABEL: "dual_attn\n(single-key)"}


def write_reproduction(reproduction: Reproduction) -> tuple[Path, list[Path]]:
    """OUT/reproduction.md and OUT/figures/NAME.png; returns (markdown, figures)."""
    out = reproduction.config.out
    figures = [plot_dataset(result, out / "figures" / f"{result.name}.png") for result in reproduction.results]
    lines = _header_lines(reproduction)
    for result, figure in zip(reproduction.results, figures):
        lines += _dataset_lines(result, Path(os.path.relpath(figure, out)).as_posix())
    markdown = out / "reproduction.md"
    write_text_atomic(markdown, "\n".join(lines).rstrip() + "\n")
    return markdown, figures


def _header_lines(reproduction: Reproduction) -> list[str]:
    config = reproduction.config
    same = is_paper_encoder(config.text_model, TEXT_MODEL) and is_paper_encoder(config.image_model,
                                                                                       IMAGE_MODEL)
    grid = (f"heads {', '.join(config.heads)} × learning rates {', '.join(f'{lr:g}' for lr in config.lrs)} × "
            f"dropout {', '.join(f'{d:g}' for d in config.dropouts)} × losses {', '.join(config.losses)}, "
            f"{config.seeds} seed(s) each, batch size {config.batch_size}, at most {config.epochs} epochs "
            f"(patience {config.patience})")
    max_length = next((r.cache.get("max_length") for r in reproduction.results if r.cache.get("max_length")), None)
    dual = ("both" if config.tokens else "pooled") if "dual_attn" in config.heads else None
    lines = ["# Reproduction: BERT + DINOv2 fusion heads and their ablations", ""]
    lines += readings_lines(config.out, batch_size=config.batch_size, max_length=max_length, epochs=config.epochs,
                            patience=config.patience, dual_attn=dual)
    lines += ["## This run", "",
              f"- Data: `{config.data}`; encoders: text `{config.text_model}`, image `{config.image_model}`.",
              "- These are the paper's encoders." if same else "- **These are not the paper's encoders "
              f"({TEXT_MODEL} + {IMAGE_MODEL})**: no comparison with published numbers is like for like.",
              f"- Grid: {grid}."]
    if config.tokens:
        lines.append("- Token sequences: every cache holds them; dual_attn trained on them as well as on the pooled "
                     "features (two rows per dataset).")
    if config.dedupe:
        lines.append("- Duplicates: validation and test posts that duplicate a training post were dropped (--dedupe), "
                     "which the paper's protocol does not do; each dataset says how many.")
    holm = " (with token sequences, within each of the two comparison tables)" if config.tokens else ""
    lines += ["- Each head's configuration is chosen on validation alone (weighted F1 for MVSA, macro F1 for "
              "Memotion, mean over seeds); test numbers are mean ± sd over seeds "
              f"[{interval_note(config.resamples)}]. Paired comparisons use the same bootstrap and Holm's correction "
              f"across each dataset's comparisons{holm}.",
              f"- Datasets: {', '.join(r.name for r in reproduction.results) or 'none found'}.", ""]
    if reproduction.skipped:
        lines += ["Skipped:", ""] + [f"- {name}: {why}" for name, why in reproduction.skipped.items()] + [""]
    return lines


def _dataset_lines(result: DatasetResult, figure: str) -> list[str]:
    cache = result.cache
    lines = [f"## {_title(result.name)}", "",
             f"- Root: `{result.root}`; cache fingerprint `{str(cache.get('fingerprint'))[:12]}`; rows "
             + ", ".join(f"{split} {n}" for split, n in result.counts.items()) + "."]
    lines += split_lines(cache, result.split_counts) + duplicate_lines(cache)
    lines += ["", f"### Our heads (test; selected on validation {metric_title(result.metric)})", ""]
    lines += _heads_table(result) + _notes(result) + ["### Beside the published numbers", ""]
    lines += _published_table(result) + [split_note(cache), ""]
    lines += ["### Paired comparisons", ""] + _comparisons(result)
    return lines + [f"![{_title(result.name)}: ours beside the published numbers]({figure})", ""]


def variants(result: DatasetResult) -> list[tuple[str, object, dict, list[dict]]]:
    """(label, Summary, uncertainty block, the grid rows it summarises) per head in ORDER: dual_attn once per features
    it ran on."""
    found = []
    for rows, uncertainty, token in ((result.rows, result.uncertainty, False),
                                     (result.token_rows, result.token_uncertainty, True)):
        if not rows:
            continue
        blocks = (uncertainty or {}).get("heads", {})
        for head, summary in best_per_head(summarise(rows, result.metric)).items():
            if token and head != "dual_attn":
                continue  # the token grid holds dual_attn alone
            label = (TOKEN_LABEL if token else POOLED_LABEL) if head == "dual_attn" else head
            found.append((label, summary, blocks.get(head, {}), rows))
    return sorted(found, key=lambda item: ORDER.index(item[0]) if item[0] in ORDER else len(ORDER))


def _heads_table(result: DatasetResult) -> list[str]:
    rows_out = []
    for label, best, block, rows in variants(result):
        config, intervals = best.config, block.get("test", {})
        rows_out.append([label, f"lr {config['lr']:g}, dropout {config['dropout']:g}, "
                     f"{loss_label(config['loss'], config['gamma'])}", str(len(best.seeds)),
                     f"{best.val_mean:.4f} ± {best.val_std:.4f}"]
                    + [test_cell(best.test[m], best.test_std[m], len(best.seeds), intervals.get(m)) for m in METRICS]
                    + [improving_cell(best), ece_cell(seed_mean_ece(rows, config))])
    header = ["head", "configuration", "seeds", f"val {metric_title(result.metric)}", "test accuracy",
              "test weighted F1", "test macro F1", "under-training", "test ECE raw → calibrated"]
    return markdown.table(header, rows_out) + [ECE_NOTE + " ECE cells: the mean over seeds.", ""]


def _notes(result: DatasetResult) -> list[str]:
    """The single-key note for pooled dual_attn, and how many runs were under-trained."""
    note = pooled_dual_attn_note([row["config"]["head"] for row in result.rows], tokens=False)
    lines = [f"Note on {POOLED_LABEL}: {note}.", ""] if note else []
    return lines + [undertraining_line(result.rows + (result.token_rows or [])), ""]


def _published_table(result: DatasetResult) -> list[str]:
    reported = _reported(result.name)
    mvsa = "weighted_f1" in reported
    rows = []
    for label, _, block, _ in variants(result):
        if not block:
            continue
        cells = [f"{block['test'][m]['mean']:.4f} [{block['test'][m]['low']:.4f}, {block['test'][m]['high']:.4f}]"
                 for m in reported]
        rows.append([f"**ours: {label}**"] + cells + (["F1 (weighted)"] if mvsa else [])
                    + ["yes", "this reproduction (seed mean [95% CI])"])
    for p in published_for(result.name):
        rows.append([p.model] + [_published_value(p, m) for m in reported] + ([p.f1_label] if mvsa else [])
                    + ["yes" if like_for_like(p, result.cache) else "no", p.source])
    if not rows:
        return ["No published numbers are known for this dataset.", ""]
    names = {"accuracy": "accuracy", "weighted_f1": "F1", "macro_f1": "macro F1"}
    header = ["model"] + [names[m] for m in reported] + (["which F1"] if mvsa else []) + ["same split", "source"]
    return markdown.table(header, rows)


def _published_value(row: Published, metric: str) -> str:
    value = row.value(metric)
    return "–" if value is None else f"{value:.{row.digits}f}"


def _comparisons(result: DatasetResult) -> list[str]:
    """The paired comparisons; with --tokens once with each dual_attn, every table corrected on its own."""
    if result.token_rows is None:
        return [f"Here dual_attn is {POOLED_LABEL}.", ""] + comparison_lines(result.uncertainty)
    return ([f"With {TOKEN_LABEL} as dual_attn:", ""] + comparison_lines(result.token_uncertainty)
            + [f"With {POOLED_LABEL} as dual_attn:", ""] + comparison_lines(result.uncertainty))


def plot_dataset(result: DatasetResult, path: Path) -> Path:
    """One panel per reported metric: our heads (seed mean, 95% CI as error bars) beside the seed paper's own heads;
    later work as dashed lines."""
    reported = _reported(result.name)
    blocks = {label: block for label, _, block, _ in variants(result) if block}
    labels = list(blocks)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = new_figure(1.5 + 3.9 * len(reported), 4.4)
    for index, metric in enumerate(reported):
        axes = figure.add_subplot(1, len(reported), index + 1)
        _bars(axes, result.name, labels, blocks, metric)
        axes.set(title=f"{_title(result.name)}: test {metric_title(metric)}", ylim=(0, 1))
        axes.grid(axis="y", alpha=0.3)
        axes.legend(fontsize="x-small", loc="upper right")
    return save_png(figure, path)


def _bars(axes, dataset: str, labels: list[str], blocks: dict, metric: str) -> None:
    positions = range(len(labels))
    means = [blocks[label]["test"][metric]["mean"] for label in labels]
    errors = [[m - blocks[label]["test"][metric]["low"] for label, m in zip(labels, means)],
              [blocks[label]["test"][metric]["high"] - m for label, m in zip(labels, means)]]
    axes.bar([p - 0.2 for p in positions], means, width=0.4, yerr=errors, capsize=3, color="tab:blue",
             label="ours (95% CI)")
    published = published_for(dataset)
    paper = {row.head: row.value(metric) for row in published if row.head and row.value(metric) is not None}
    shown = [(p, paper[_head(label)]) for p, label in zip(positions, labels) if _head(label) in paper]
    if shown:
        axes.bar([p + 0.2 for p, _ in shown], [v for _, v in shown], width=0.4, color="tab:orange",
                 label="seed paper")
    later = [r for r in published if r.head is None and r.value(metric) is not None and not r.source.startswith("Seed")]
    for row, style in zip(later, ("--", ":", "-.")):
        axes.axhline(row.value(metric), linestyle=style, color="0.3", linewidth=1, label=row.model)
    axes.set_xticks(list(positions), [SHORT.get(label, label) for label in labels], rotation=20, fontsize="small")


def _head(label: str) -> str:
    return "dual_attn" if label in (TOKEN_LABEL, POOLED_LABEL) else label


def _title(dataset: str) -> str:
    return DATASETS[dataset].title if dataset in DATASETS else dataset


def _reported(dataset: str) -> tuple[str, ...]:
    """What the dataset's literature reports, so the figure and the comparison table show those."""
    return DATASETS[dataset].reported if dataset in DATASETS else METRICS
