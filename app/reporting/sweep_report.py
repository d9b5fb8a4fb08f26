"""An encoder sweep's report: report.md (the table of caches and heads, the paired differences) and one figure, the
test metric of each head's chosen configuration per encoder pair with its 95% interval. Written from sweep.json
(app/reporting/sweep.py); matplotlib is imported inside the function, as in app/reporting/report.py."""

from __future__ import annotations

from pathlib import Path

from fusion.app.reporting import markdown
from fusion.atomic import write_text_atomic
from fusion.heads.config import loss_label
from fusion.paper import metric_title

FIGURE = "sweep_heads.png"


def write_sweep_report(out: Path, document: dict) -> tuple[Path, Path]:
    figure = plot_heads(document, out / FIGURE)
    lines = [f"# Encoder sweep: {document['dataset']}", "",
             f"The same grid on {len(document['caches'])} caches of {document['dataset']}, each made with other "
             f"encoders. Configurations are chosen on validation {_name(document)}; their test "
             f"{_name(document)} is shown with its {document['level']:.0%} bootstrap interval over the "
             f"{document['test_rows']} test rows (mean over seeds when several). {document['method']}, "
             f"{document['resamples']} resamples; {document.get('correction', 'no correction')}.", "",
             "## Best configuration per cache", "", *_best_table(document),
             "## Per head", "", *_head_table(document),
             f"## Differences from {document['leader']} (best on validation)", "", *_difference_table(document),
             f"![test {_name(document)} per encoder pair and head]({figure.name})", ""]
    markdown = out / "report.md"
    write_text_atomic(markdown, "\n".join(lines))
    return markdown, figure


def _name(document: dict) -> str:
    return metric_title(document["metric"])


def _interval(test: dict) -> str:
    return f"{test['value']:.4f} [{test['low']:.4f}, {test['high']:.4f}]"


def _config(config: dict) -> str:
    return f"{config['head']}, lr {config['lr']:g}, dropout {config['dropout']:g}, " \
           f"{loss_label(config['loss'], config['gamma'])}"



def _best_table(document: dict) -> list[str]:
    rows = [[entry["name"], entry["encoders"], _config(entry["chosen"]["best"]["config"]),
             f"{entry['chosen']['best']['val_mean']:.4f}", _interval(entry["chosen"]["best"]["test"])]
            for entry in document["caches"]]
    return markdown.table(["cache", "encoders (pooling)", "configuration", f"val {_name(document)}",
                   f"test {_name(document)} [95% CI]"], rows)


def _heads(document: dict) -> list[str]:
    return [key for key in document["caches"][0]["chosen"] if key != "best"]


def _head_table(document: dict) -> list[str]:
    heads = _heads(document)
    rows = [[entry["name"], *(_interval(entry["chosen"][head]["test"]) if head in entry["chosen"] else "-"
                               for head in heads)] for entry in document["caches"]]
    return markdown.table(["cache", *heads], rows)


def _difference_table(document: dict) -> list[str]:
    rows = [[f"{d['a']} − {d['b']}", d["what"], f"{d['difference']:+.4f}", f"[{d['low']:+.4f}, {d['high']:+.4f}]",
             "yes" if d["excludes_zero"] else "no", f"{d['p_holm']:.3f}", "yes" if d["significant"] else "no"]
            for d in document["differences"]]
    note = (f"p (Holm): the bootstrap's two-sided p-value, corrected across the {len(document['differences'])} "
            "differences of this table; significant = the interval excludes 0 and p (Holm) <= 0.05.")
    return markdown.table(["caches", "configuration", f"Δ test {_name(document)}", "95% CI", "excludes 0", "p (Holm)",
                           "significant"], rows) + [note, ""]


def plot_heads(document: dict, path: Path) -> Path:
    """Grouped bars: one group per head, one bar per cache, each with its bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, caches = _heads(document), document["caches"]
    width = 0.8 / len(caches)
    figure, axes = plt.subplots(figsize=(2.5 + 1.4 * len(heads) + 0.3 * len(caches), 3.4 + 0.25 * len(caches)),
                                layout="constrained")
    for number, entry in enumerate(caches):
        tests = [entry["chosen"][head]["test"] for head in heads]
        positions = [h + (number - (len(caches) - 1) / 2) * width for h in range(len(heads))]
        values = [test["value"] for test in tests]
        errors = [[test["value"] - test["low"] for test in tests], [test["high"] - test["value"] for test in tests]]
        axes.bar(positions, values, width, yerr=errors, capsize=3, label=f"{entry['name']}: {entry['encoders']}")
    axes.set_xticks(range(len(heads)), heads)
    axes.set(ylabel=f"test {_name(document)} ({document['level']:.0%} bootstrap CI)",
             title=f"{document['dataset']}: test {_name(document)} per encoder pair and head")
    figure.legend(loc="outside lower center", fontsize="small", frameon=False)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
