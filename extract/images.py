"""Find image files by the name a label file gives, and decode them to RGB (or say why not).

`load_rgb` is safe in DataLoader workers: it keeps no open file, touches no global state for well-formed files,
and raises only `ImageUnreadable` (a plain picklable exception) for files it cannot decode.
"""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Pillow's own default limit (about 89 million pixels): anything larger is refused as a decompression bomb,
# before any pixel is decoded. (Pillow itself still emits its DecompressionBombWarning for 1-2x this size; the
# warnings filters are global and not thread-safe to swap, so they are left alone.)
MAX_PIXELS = 89_478_485
# A 1 x 2,000,000 PNG is 4 KB and within MAX_PIXELS, but an image processor scaling its short side to 256 would
# allocate hundreds of GB: refuse shapes no photo or meme has (a long screenshot is ~1:30).
MAX_ASPECT_RATIO = 100
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".jpe", ".bmp", ".webp", ".gif", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as a viewer would show a meme

# ImageFile.LOAD_TRUNCATED_IMAGES is a module global read at load time; Pillow has no per-image switch.
# It is set only while re-reading a file that failed as truncated, under this lock, and then restored,
# so well-formed files (and other code loading images) never see it changed.
_TRUNCATED_LOCK = threading.Lock()


class ImageUnreadable(Exception):
    """The file is not a decodable image; str(error) is the short reason stored in the cache."""


def load_rgb(path: Path | bytes | Image.Image) -> Image.Image:
    """Decode `path` (or an image file's bytes, or an image already opened with Pillow) to an RGB image (first frame
    of animations); ImageUnreadable with a reason otherwise."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        return _load_bytes(bytes(path))
    if isinstance(path, Image.Image):
        _refuse_bomb(path.size)
        return to_rgb(path)
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise ImageUnreadable("missing file") from None
    if size == 0:
        raise ImageUnreadable("empty file")
    try:
        image = _open_loaded(path)
    except OSError as err:
        if err.errno is not None:  # the file itself cannot be read (permissions, a folder, I/O error)
            raise ImageUnreadable(f"cannot read file ({err.strerror})") from None
        if "truncated" not in str(err).lower():
            raise ImageUnreadable(f"corrupt image data ({_short(err)})") from None
        image = _open_loaded_truncated(path)
    return image


def _load_bytes(data: bytes) -> Image.Image:
    """The checks of a file, on bytes held in memory (an image stored inside a dataset: extract/datasets/hfdata.py)."""
    if not data:
        raise ImageUnreadable("empty image data")
    try:
        return _open_loaded(io.BytesIO(data))
    except OSError as err:
        if "truncated" not in str(err).lower():
            raise ImageUnreadable(f"corrupt image data ({_short(err)})") from None
        return _open_loaded_truncated(io.BytesIO(data))


def _open_loaded(path: Path | io.BytesIO) -> Image.Image:
    """Open, refuse bombs before decoding, decode the first frame to RGB; the file is closed on return."""
    try:
        with Image.open(path) as image:
            _refuse_bomb(image.size)
            image.load()
            rgb = to_rgb(image)
            return rgb.copy() if rgb is image else rgb  # detached from the (closing) file object
    except UnidentifiedImageError:
        raise ImageUnreadable("not an image (cannot identify image file)") from None
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise ImageUnreadable(f"decompression bomb ({found.group(1) if found else 'too many'} pixels)") from None
    except (ValueError, SyntaxError, EOFError) as err:  # some plugins report broken headers this way
        raise ImageUnreadable(f"corrupt image data ({_short(err)})") from None


def _open_loaded_truncated(path: Path | io.BytesIO) -> Image.Image:
    with _TRUNCATED_LOCK:
        before = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return _open_loaded(path)
        except OSError:
            raise ImageUnreadable("truncated beyond repair") from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = before


def _refuse_bomb(size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageUnreadable(f"decompression bomb ({width} x {height} pixels)")
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise ImageUnreadable(f"extreme aspect ratio ({width} x {height} pixels)")


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:80] if str(err) else type(err).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha composited on white, 16/32-bit and float greys rescaled to 0..255."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")  # applies the palette's transparency, if any
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(_grey_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageUnreadable(f"unsupported image mode {image.mode} ({_short(err)})") from None


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit greys scaled by 1/257; 32-bit ints as 8- or 16-bit by their range; floats in [0, 1] times 255;
    anything else min-max scaled."""
    values = values.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and 255 < high <= 65535 and low >= 0):
        values = values / 257.0
    elif mode == "F" and 0.0 <= low and high <= 1.0:
        values = values * 255.0
    elif low < 0 or high > 255:
        values = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


class ImageFolder:
    """Resolves image names inside one folder: the exact name, else a case-insensitive match, else the same
    stem with another image extension (memotion lists `image_5.jpg` for a file saved as `image_5.png`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._by_lower: dict[str, str] | None = None
        self._by_stem: dict[str, list[str]] | None = None

    def resolve(self, name: str) -> Path | None:
        exact = self.folder / name
        if _is_file(exact):
            return exact
        self._index()
        lower = name.lower()
        if lower in self._by_lower:
            return self.folder / self._by_lower[lower]
        candidates = self._by_stem.get(os.path.splitext(lower)[0], [])
        return self.folder / _preferred(candidates) if candidates else None

    def _index(self) -> None:
        """List the folder once (thousands of lookups then cost a dict access each)."""
        if self._by_lower is not None:
            return
        names = sorted(os.listdir(self.folder)) if _is_dir(self.folder) else []
        self._by_lower, self._by_stem = {}, {}
        for name in names:
            stem, ext = os.path.splitext(name.lower())
            self._by_lower.setdefault(name.lower(), name)
            if ext in IMAGE_EXTENSIONS:
                self._by_stem.setdefault(stem, []).append(name)


def _is_file(path: Path) -> bool:
    """Path.is_file, False also for names the OS refuses (too long: a label file may hold any text)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _preferred(names: list[str]) -> str:
    """Deterministic choice among same-stem files: the order of IMAGE_EXTENSIONS, then the name."""
    return min(names, key=lambda n: (IMAGE_EXTENSIONS.index(os.path.splitext(n.lower())[1]), n))
