"""The matrix of unusual and hostile image files every entry point must survive (`fusion extract` skips with a reason,
`fusion serve` answers 200 or 4xx, never 5xx): each file with the outcome worked out here from the file's own
values, independently of extract/images.py.

    for case in matrix():  # case.name, case.filename, case.data, case.reason (None: decodes), case.first_pixel
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

# A minimal Encapsulated PostScript file: Pillow would hand it to Ghostscript if it were ever opened as EPS.
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
       b"newpath 0 0 moveto 16 0 lineto 16 16 lineto closepath fill showpage\n%%EOF\n")
REFUSED_FORMAT = "image format not accepted (looks like EPS"


@dataclass(frozen=True)
class Case:
    name: str
    filename: str
    data: bytes
    reason: str | None = None  # the start of the skip reason; None: the file decodes
    first_pixel: tuple[int, int, int] | None = None  # the RGB of pixel (0, 0) once decoded, where it is known
    last_pixel: tuple[int, int, int] | None = None  # and of the last pixel (ramps)


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def grey(value: int) -> tuple[int, int, int]:
    return (value, value, value)


def ramp(low: float, high: float, dtype, shape=(16, 16)) -> np.ndarray:
    return np.linspace(low, high, shape[0] * shape[1]).astype(dtype).reshape(shape)


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    image.putpixel((0, 0), 0)  # index 0 is transparent: shown on white
    return saved(image, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    return out.getvalue()


def matrix() -> list[Case]:
    """Every case of the issue's matrix. 16-bit values map by v / 257; floats in [0, 1] by 255 v; values outside
    every nominal range are stretched from their lowest (0) to their highest (255); a flat image outside them keeps
    its value, clipped to 0..255."""
    flat16 = np.full((16, 16), 40_000, dtype=np.uint16)
    return [
        Case("cmyk-jpeg", "cmyk.jpg", saved(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
             first_pixel=(255, 0, 0)),
        Case("palette-png-transparency", "palette.png", _palette_with_transparency(), first_pixel=(255, 255, 255),
             last_pixel=(200, 30, 40)),
        Case("animated-gif", "animated.gif", _animated_gif(), first_pixel=(250, 0, 0)),
        Case("one-bit", "bits.png", saved(Image.new("1", (16, 16), 1), "PNG"), first_pixel=(255, 255, 255)),
        Case("grey-alpha", "la.png", saved(Image.new("LA", (16, 16), (90, 0)), "PNG"), first_pixel=(255, 255, 255)),
        Case("sliver-1x4000", "sliver.png", saved(Image.new("RGB", (1, 4000), (9, 9, 9)), "PNG"),
             reason="extreme aspect ratio"),
        Case("png-16-bit-flat", "flat16.png", saved(Image.fromarray(flat16), "PNG"), first_pixel=grey(156)),
        Case("png-16-bit-ramp", "ramp16.png", saved(Image.fromarray(ramp(0, 65535, np.uint16)), "PNG"),
             first_pixel=grey(0), last_pixel=grey(255)),
        Case("tiff-16-bit-flat", "flat16.tif", saved(Image.fromarray(flat16), "TIFF"), first_pixel=grey(156)),
        Case("tiff-16-bit-ramp", "ramp16.tif", saved(Image.fromarray(ramp(0, 65535, np.uint16)), "TIFF"),
             first_pixel=grey(0), last_pixel=grey(255)),
        Case("tiff-float-flat", "flatf.tif", saved(Image.fromarray(np.full((16, 16), 0.25, np.float32)), "TIFF"),
             first_pixel=grey(64)),
        Case("tiff-float-flat-out-of-range", "flatf-big.tif",
             saved(Image.fromarray(np.full((16, 16), 7.5e3, np.float32)), "TIFF"), first_pixel=grey(255)),
        Case("tiff-float-ramp", "rampf.tif", saved(Image.fromarray(ramp(0, 1, np.float32)), "TIFF"),
             first_pixel=grey(0), last_pixel=grey(255)),
        Case("tiff-float-out-of-range", "rampf-wide.tif", saved(Image.fromarray(ramp(-2.0, 3e4, np.float32)), "TIFF"),
             first_pixel=grey(0), last_pixel=grey(255)),
        Case("tiff-int32-negative-flat", "neg32.tif",
             saved(Image.fromarray(np.full((16, 16), -70_000, np.int32)), "TIFF"), first_pixel=grey(0)),
        Case("tiff-int32-negative-ramp", "neg32-ramp.tif",
             saved(Image.fromarray(ramp(-1000, 1000, np.int32)), "TIFF"), first_pixel=grey(0), last_pixel=grey(255)),
        Case("eps", "figure.eps", EPS, reason=REFUSED_FORMAT),
        Case("postscript-named-jpg", "photo.jpg", EPS, reason=REFUSED_FORMAT),
    ]
