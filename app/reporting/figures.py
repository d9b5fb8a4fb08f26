"""Figures on their own Agg canvas, written atomically: what every report's PNGs are drawn on."""

from __future__ import annotations

from pathlib import Path

from fusion.atomic import write_atomic
from fusion.errors import FusionError, install_extra


def new_figure(width: float, height: float):
    """A figure on its own Agg canvas: no pyplot, so no global backend or figure registry is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise FusionError(f"fusion report needs matplotlib: {install_extra('report')}") from None
    return FigureCanvasAgg(Figure(figsize=(width, height), dpi=110, layout="constrained")).figure


def save_png(figure, path: Path) -> Path:
    # No 'Software' stamp: the same data gives the same bytes.
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", metadata={"Software": None}))
    return path
