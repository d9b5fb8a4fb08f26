"""reproduction.md and its figures: `fusion reproduce`'s heads and ablations, per dataset, beside the published numbers.

Per dataset: our five heads (the best configuration of each on validation, every seed) with test accuracy, weighted F1
and macro F1 as mean ± sd over seeds and a 95% hierarchical bootstrap interval (seeds, then test rows); the same beside
the seed paper's Table 1 (MVSA) or Memotion figure and later work; the best fusion head against each ablation and each
other head by a paired hierarchical bootstrap, Holm-corrected; one figure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fusion.app.reporting import markdown
from fusion.app.reporting.calibration import ECE_NOTE, ece_cell, seed_mean_ece
from fusion.app.reporting.duplicates import duplicate_lines
from fusion.app.reporting.published import Published, published_for, split_lines, split_note
from fusion.app.reporting.report import (comparison_lines, interval_note, is_paper_encoder, new_figure, save_png,
                                         test_cell)
from fusion.atomic import write_text_atomic
from fusion.heads.config import loss_label
from fusion.heads.search.summary import best_per_head, summarise
from fusion.paper import DATASETS, IMAGE_MODEL, METRICS, TEXT_MODEL, metric_title

if TYPE_CHECKING:  # the command body (app/reproduce.py) makes what this module writes
    from fusion.app.reproduce import DatasetResult, Reproduction


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
            f"{config.seeds} seed(s) each, at most {config.epochs} epochs (patience {config.patience})")
    lines = ["# Reproduction: BERT + DINOv2 fusion heads and their ablations", "",
             f"- Data: `{config.data}`; encoders: text `{config.text_model}`, image `{config.image_model}`.",
             "- These are the paper's encoders." if same else "- **These are not the paper's encoders "
             f"({TEXT_MODEL} + {IMAGE_MODEL})**: no comparison with published numbers is like for like.",
             f"- Grid: {grid}.",
             "- Each head's configuration is chosen on validation alone (weighted F1 for MVSA, macro F1 for Memotion, "
             f"mean over seeds); test numbers are mean ± sd over seeds [{interval_note(config.resamples)}]. Paired "
             "comparisons use the same bootstrap and Holm's correction across each dataset's comparisons.",
             f"- Datasets: {', '.join(r.name for r in reproduction.results) or 'none found'}.", ""]
    if reproduction.skipped:
        lines += ["Skipped:", ""] + [f"- {name}: {why}" for name, why in reproduction.skipped.items()] + [""]
    return lines


def _dataset_lines(result: DatasetResult, figure: str) -> list[str]:
    cache = result.cache
    lines = [f"## {_title(result.name)}", "",
             f"- Root: `{result.root}`; cache fingerprint `{str(cache.get('fingerprint'))[:12]}`; rows "
             + ", ".join(f"{split} {n}" for split, n in result.counts.items()) + "."]
    lines += split_lines(cache) + duplicate_lines(cache)
    lines += ["", f"### Our heads (test; selected on validation {metric_title(result.metric)})", ""]
    lines += _heads_table(result) + ["### Beside the published numbers", ""] + _published_table(result)
    lines += [split_note(cache), ""]
    lines += ["### Paired comparisons", ""] + comparison_lines(result.uncertainty)
    return lines + [f"![{_title(result.name)}: ours beside the published numbers]({figure})", ""]


def _heads_table(result: DatasetResult) -> list[str]:
    summaries = summarise(result.rows, result.metric)
    heads = (result.uncertainty or {}).get("heads", {})
    rows = []
    for head, best in _in_order(best_per_head(summaries)):
        config, intervals = best.config, heads.get(head, {}).get("test", {})
        rows.append([head, f"lr {config['lr']:g}, dropout {config['dropout']:g}, "
                     f"{loss_label(config['loss'], config['gamma'])}", str(len(best.seeds)),
                     f"{best.val_mean:.4f} ± {best.val_std:.4f}"]
                    + [test_cell(best.test[m], best.test_std[m], len(best.seeds), intervals.get(m)) for m in METRICS]
                    + [ece_cell(seed_mean_ece(result.rows, config))])
    header = ["head", "configuration", "seeds", f"val {metric_title(result.metric)}", "test accuracy",
              "test weighted F1", "test macro F1", "test ECE raw → calibrated"]
    return markdown.table(header, rows) + [ECE_NOTE + " ECE cells: the mean over seeds.", ""]


def _in_order(best: dict) -> list:
    order = ("basic", "self_attn", "dual_attn", "text_only", "image_only")
    return sorted(best.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))


def _published_table(result: DatasetResult) -> list[str]:
    reported = _reported(result.name)
    heads = (result.uncertainty or {}).get("heads", {})
    rows = []
    for head, block in _in_order(heads):
        cells = [f"{block['test'][m]['mean']:.4f} [{block['test'][m]['low']:.4f}, {block['test'][m]['high']:.4f}]"
                 for m in reported]
        rows.append([f"**ours: {head}**"] + cells + ["this reproduction (seed mean [95% CI])"])
    rows += [[p.model] + [_published_value(p, m) for m in reported] + [p.source] for p in published_for(result.name)]
    if not rows:
        return ["No published numbers are known for this dataset.", ""]
    names = {"accuracy": "accuracy", "weighted_f1": "F1 (weighted)", "macro_f1": "macro F1"}
    return markdown.table(["model"] + [names[m] for m in reported] + ["source"], rows)


def _published_value(row: Published, metric: str) -> str:
    value = getattr(row, metric)
    return "–" if value is None else f"{value:.{row.digits}f}"



def plot_dataset(result: DatasetResult, path: Path) -> Path:
    """One panel per reported metric: our heads (seed mean, 95% CI as error bars) beside the seed paper's own heads;
    later work as dashed lines."""
    reported = _reported(result.name)
    heads = [head for head, _ in _in_order((result.uncertainty or {}).get("heads", {}))]
    blocks = (result.uncertainty or {}).get("heads", {})
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = new_figure(1.5 + 3.6 * len(reported), 4.2)
    for index, metric in enumerate(reported):
        axes = figure.add_subplot(1, len(reported), index + 1)
        _bars(axes, result.name, heads, blocks, metric)
        axes.set(title=f"{_title(result.name)}: test {metric_title(metric)}", ylim=(0, 1))
        axes.grid(axis="y", alpha=0.3)
        axes.legend(fontsize="x-small", loc="upper right")
    return save_png(figure, path)


def _bars(axes, dataset: str, heads: list[str], blocks: dict, metric: str) -> None:
    positions = range(len(heads))
    means = [blocks[h]["test"][metric]["mean"] for h in heads]
    errors = [[m - blocks[h]["test"][metric]["low"] for h, m in zip(heads, means)],
              [blocks[h]["test"][metric]["high"] - m for h, m in zip(heads, means)]]
    axes.bar([p - 0.2 for p in positions], means, width=0.4, yerr=errors, capsize=3, color="tab:blue",
             label="ours (95% CI)")
    published = published_for(dataset)
    paper = {row.head: getattr(row, metric) for row in published if row.head and getattr(row, metric) is not None}
    shown = [(p, paper[h]) for p, h in zip(positions, heads) if h in paper]
    if shown:
        axes.bar([p + 0.2 for p, _ in shown], [v for _, v in shown], width=0.4, color="tab:orange",
                 label="seed paper")
    for row, style in zip([r for r in published if r.head is None and getattr(r, metric) is not None
                           and not r.source.startswith("Seed paper")], ("--", ":", "-.")):
        axes.axhline(getattr(row, metric), linestyle=style, color="0.3", linewidth=1, label=row.model)
    axes.set_xticks(list(positions), heads, rotation=20, fontsize="small")


def _title(dataset: str) -> str:
    return DATASETS[dataset].title if dataset in DATASETS else dataset


def _reported(dataset: str) -> tuple[str, ...]:
    """What the dataset's literature reports, so the figure and the comparison table show those."""
    return DATASETS[dataset].reported if dataset in DATASETS else METRICS
