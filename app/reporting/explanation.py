"""The picture of one explained prediction (`fusion predict --explain --out DIR` writes NAME.explain.png):

- left, the image as the encoder saw it (the part `image_view` names) with the patch weights laid over it, the
  weights the text's query gave each patch (dual_attn on token sequences only);
- right, the modality bars: the probabilities of the post, of its text alone and of its image alone;
- beneath, the text as the model read it, each word piece shaded by the weight the image's query gave it.

matplotlib is imported inside the functions (app/reporting/report.py new_figure), so fusion runs without it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fusion.app.reporting.figures import new_figure, save_png
from fusion.extract.images import load_rgb
from fusion.labels import LABELS

COLOURS = {"negative": "#d64545", "neutral": "#8b93a3", "positive": "#2e9d5b"}
BARS = (("probabilities", "post"), ("text_only", "text alone"), ("image_only", "image alone"))
SHADE = (0.95, 0.55, 0.05)  # the words' highlight colour, its opacity proportional to the weight
CHARACTERS_PER_LINE = 90  # of the shaded words across the figure's 9 inches (they wrap when a piece does not fit)
SPECIAL = ("[CLS]", "[SEP]", "<s>", "</s>", "<|startoftext|>", "<|endoftext|>")


def write_explanation_png(image: Any, text: str, answer: dict, path: Path) -> Path:
    """The figure of `answer` (a Predictor answer made with explain=True) for the post (image: a path, bytes or a
    PIL image; text: as given) at `path`."""
    explanation = answer["explanation"]
    words = explanation.get("text_attention")
    characters = sum(len(entry["token"]) + 1 for entry in words) if words else len(text)
    text_height = 0.5 + 0.32 * math.ceil(characters / CHARACTERS_PER_LINE)  # inches: a title, then the lines
    figure = new_figure(9.0, 4.6 + text_height)
    grid = figure.add_gridspec(2, 2, height_ratios=(4.2, text_height), width_ratios=(1.0, 1.15))
    _draw_image(figure.add_subplot(grid[0, 0]), figure, image, explanation)
    _draw_bars(figure.add_subplot(grid[0, 1]), answer)
    figure.canvas.draw()  # the layout settles first, so the words are measured in their final axes
    _draw_words(figure.add_subplot(grid[1, :]), figure, text, explanation.get("text_attention"))
    figure.suptitle(f"{answer['label']} ({answer['calibration']} probabilities)", fontweight="bold")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(figure, path)


def write_explanation_pngs(out: Path, images: list, texts: list[str], lines: list, answers: list[dict]) -> list[Path]:
    """OUT/NAME.explain.png for each answered post, NAME its image's file name without the suffix (with "-lineN" added
    where two posts of a CSV share one); returns the paths written."""
    written, used = [], set()
    for image, text, line, answer in zip(images, texts, lines, answers):
        if "explanation" not in answer:
            continue
        name = Path(image).stem if isinstance(image, (str, Path)) else f"post-{len(written) + 1}"
        if name in used:
            name = f"{name}-line{line}" if line is not None else f"{name}-{len(written) + 1}"
        used.add(name)
        written.append(write_explanation_png(image, text, answer, Path(out) / f"{name}.explain.png"))
    return written


def view_of(picture, box: dict | None):
    """The part of a PIL image that `box` (fractions: left, top, width, height) names; the whole image for None."""
    if not box:
        return picture
    width, height = picture.size
    left, top = round(box["left"] * width), round(box["top"] * height)
    right, bottom = round((box["left"] + box["width"]) * width), round((box["top"] + box["height"]) * height)
    return picture.crop((left, top, max(right, left + 1), max(bottom, top + 1)))


def _draw_image(axes, figure, image: Any, explanation: dict) -> None:
    weights = explanation.get("image_attention")
    picture = view_of(load_rgb(image), explanation.get("image_view") if weights else None)
    axes.imshow(np.asarray(picture), extent=(0, 1, 1, 0))
    if weights:
        grid = np.asarray(weights, dtype=np.float64)
        shown = axes.imshow(grid, extent=(0, 1, 1, 0), cmap="inferno", alpha=0.55, interpolation="nearest",
                            vmin=0.0, vmax=max(float(grid.max()), 1e-12))
        figure.colorbar(shown, ax=axes, shrink=0.75, label="patch weight (sums to 1)")
        axes.set_title(f"where the text's query looked: {grid.shape[0]} x {grid.shape[1]} patches\n"
                       f"(class token {explanation['image_attention_cls']:.3f} before renormalising)",
                       fontsize="small")
    else:
        axes.set_title("the image (this run reads pooled embeddings: no patch attention)", fontsize="small")
    axes.set_xlim(0, 1)
    axes.set_ylim(1, 0)
    axes.set_axis_off()


def _draw_bars(axes, answer: dict) -> None:
    explanation = answer["explanation"]
    shown = [(title, answer["probabilities"] if key == "probabilities" else explanation.get(key))
             for key, title in BARS]
    shown = [(title, values) for title, values in shown if values]
    height = 0.8 / len(LABELS)
    for row, (_, values) in enumerate(shown):
        for index, name in enumerate(LABELS):
            y = row + (index - 1) * height
            axes.barh(y, values[name], height=height * 0.9, color=COLOURS[name],
                      label=name if row == 0 else None)
            axes.text(values[name] + 0.01, y, f"{values[name]:.3f}", va="center", fontsize="x-small")
    axes.set_yticks(range(len(shown)), [title for title, _ in shown])
    axes.invert_yaxis()
    axes.set(xlim=(0, 1.12), xlabel="probability", title="what the post, and each modality alone, says")
    axes.legend(fontsize="x-small", loc="lower right")
    if "note" in explanation:
        axes.text(0, len(shown), explanation["note"], fontsize="x-small", wrap=True, va="top")


def _draw_words(axes, figure, text: str, attention: list[dict] | None) -> None:
    """Word pieces left to right, wrapped, each on a background as strong as its weight (the largest: full)."""
    axes.set_axis_off()
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    if not attention:
        axes.text(0, 0.95, text, va="top", wrap=True, fontsize="medium")
        axes.set_title("the text (no word attention for this run)", fontsize="small", loc="left")
        return
    axes.set_title("the text as the model read it, shaded by the weight the image's query gave each piece "
                   "(the weights sum to 1)", fontsize="small", loc="left")
    renderer = figure.canvas.get_renderer()
    largest = max(entry["weight"] for entry in attention) or 1.0
    x, y = 0.0, 0.9
    for entry in attention:
        token = entry["token"]
        joined = token.startswith("##")
        shown = token[2:] if joined else token
        if x > 0 and not joined:
            x += 0.008
        label = axes.text(x, y, shown, va="top", fontsize="medium",
                          fontstyle="italic" if token in SPECIAL else "normal", in_layout=False,
                          bbox={"boxstyle": "square,pad=0.15", "linewidth": 0,
                                "facecolor": (*SHADE, entry["weight"] / largest)})
        extent = axes.transAxes.inverted().transform_bbox(label.get_window_extent(renderer))
        width = extent.width
        if x + width > 1.0 and x > 0:  # wrap: the piece starts the next line
            x, y = 0.0, y - 1.6 * extent.height
            label.set_position((x, y))
        x += width
