"""Find image files by the name a label file gives, and decode them to RGB (or say why not): the one decoder of
`fusion extract`, `fusion predict` and `fusion serve`.

`load_rgb` is safe in DataLoader workers and server threads: it keeps no open file, touches no global state for
well-formed files, and raises only `ImageUnreadable` (a plain picklable exception) for files it cannot decode. What it
will not do, whatever the file says:
- open a format outside ACCEPTED_FORMATS (Pillow would hand an EPS to Ghostscript): it is named and refused;
- decode more than `max_pixels` pixels, or a shape no photo has (refused from the header, before any pixel);
- keep a large image at full size: JPEGs are decoded at a reduced scale, other formats reduced by a whole factor right
  after decoding, before any conversion (REDUCED_SHORT_SIDE), so memory per decode is the decoded image once;
- make float64 copies: 16-bit, 32-bit and float greys are scaled to 8 bits a band of rows at a time.
"""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Pillow's own default limit (about 89 million pixels): anything larger is refused as a decompression bomb,
# before any pixel is decoded. (Pillow itself still emits its DecompressionBombWarning for 1-2x this size; the
# warnings filters are global and not thread-safe to swap, so they are left alone.) `fusion serve --max-pixels`
# sets a lower one per call.
MAX_PIXELS = 89_478_485
# A 1 x 2,000,000 PNG is 4 KB and within MAX_PIXELS, but an image processor scaling its short side to 256 would
# allocate hundreds of GB: refuse shapes no photo or meme has (a long screenshot is ~1:30).
MAX_ASPECT_RATIO = 100
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".jpe", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# The formats a post's image may be in: those of photos and memes. Everything else Pillow could open (EPS and
# PostScript through Ghostscript, PSD, PDF-like containers, scientific formats) is refused by name, never parsed.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
SHOWN_FORMATS = "JPEG, PNG, GIF, WebP, BMP, TIFF"
# A large image is reduced by the largest whole factor that keeps its short side at least this long: four times
# what the paper's image processor keeps (DINOv2: short side 256, then a 224 crop), so the processor still
# downsamples with its own filter, while a 64 MP photo becomes about 1 MP right after decoding. Images with a short
# side under twice this are left as decoded. Part of the cache fingerprint (DECODING, extract/encoders.py).
REDUCED_SHORT_SIDE = 1024
DECODING = (f"formats {SHOWN_FORMATS}; reduced by whole factors (JPEG scale, box) to a short side of at least "
            f"{REDUCED_SHORT_SIDE}; 16/32-bit and float greys by nominal range, else min-max")
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as a viewer would show a meme
# Rows of a 16/32-bit or float image converted at a time: bounded float32 temporaries (about 4 MB).
GREY_CHUNK_PIXELS = 1 << 20

# ImageFile.LOAD_TRUNCATED_IMAGES is a module global read at load time; Pillow has no per-image switch.
# It is set only while re-reading a file that failed as truncated, under this lock, and then restored,
# so well-formed files (and other code loading images) never see it changed.
_TRUNCATED_LOCK = threading.Lock()


class ImageUnreadable(Exception):
    """The file is not a decodable image; str(error) is the short reason stored in the cache."""


def load_rgb(source: Path | str | bytes | BinaryIO | Image.Image, *, max_pixels: int | None = None) -> Image.Image:
    """Decode `source` (a path, an image file's bytes, a binary file object such as an upload, or an image already
    opened with Pillow) to an RGB image (the first frame of animations), reduced when large (REDUCED_SHORT_SIDE);
    ImageUnreadable with a reason otherwise. max_pixels: the largest image accepted (default MAX_PIXELS)."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, Image.Image):
        _refuse_bomb(source.size, max_pixels)
        return _decoded(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ImageUnreadable("empty image data")
        return _load(io.BytesIO(bytes(source)), max_pixels)
    if hasattr(source, "read"):
        if _stream_size(source) == 0:
            raise ImageUnreadable("empty file")
        return _load(source, max_pixels)
    path = Path(source)
    try:
        size = path.stat().st_size
    except OSError:
        raise ImageUnreadable("missing file") from None
    if size == 0:
        raise ImageUnreadable("empty file")
    return _load(path, max_pixels)


def _stream_size(stream: BinaryIO) -> int:
    try:
        size = stream.seek(0, io.SEEK_END)
        stream.seek(0)
    except (OSError, ValueError) as err:
        raise ImageUnreadable(f"cannot read the upload ({_short(err)})") from None
    return size


def _load(source: Path | BinaryIO, max_pixels: int) -> Image.Image:
    try:
        return _open_loaded(source, max_pixels)
    except OSError as err:
        if err.errno is not None:  # the file itself cannot be read (permissions, a folder, I/O error)
            raise ImageUnreadable(f"cannot read file ({err.strerror})") from None
        if "truncated" not in str(err).lower():
            raise ImageUnreadable(f"corrupt image data ({_short(err)})") from None
        return _open_loaded_truncated(source, max_pixels)


def _open_loaded(source: Path | BinaryIO, max_pixels: int) -> Image.Image:
    """Open among the accepted formats, refuse bombs before decoding, decode the first frame (a JPEG at a reduced
    scale when large), reduce, convert to RGB; the file is closed (a file object left open) on return."""
    try:
        with Image.open(source, formats=ACCEPTED_FORMATS) as image:
            _refuse_bomb(image.size, max_pixels)
            factor = reduction_factor(image.size)
            if factor > 1 and image.format in ("JPEG", "MPO"):
                width, height = image.size
                image.draft(None, (-(-width // factor), -(-height // factor)))  # DCT scaling: 1/2, 1/4 or 1/8
            image.load()
            return _decoded(image)
    except UnidentifiedImageError:
        raise ImageUnreadable(_unidentified(source)) from None
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise ImageUnreadable(f"decompression bomb ({found.group(1) if found else 'too many'} pixels)") from None
    except (ImageUnreadable, OSError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - a plugin meeting a hostile file raises anything (struct.error,
        # IndexError, ValueError, ZeroDivisionError...): the file is unreadable, the caller keeps going
        raise ImageUnreadable(f"corrupt image data ({type(err).__name__}: {_short(err)})") from None


def _open_loaded_truncated(source: Path | BinaryIO, max_pixels: int) -> Image.Image:
    with _TRUNCATED_LOCK:
        before = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return _open_loaded(source, max_pixels)
        except OSError:
            raise ImageUnreadable("truncated beyond repair") from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = before


def _unidentified(source: Path | BinaryIO) -> str:
    """Why no accepted format opened the file: the refused format its first bytes announce, or not an image."""
    try:
        if isinstance(source, Path):
            with source.open("rb") as handle:
                prefix = handle.read(16)
        else:
            source.seek(0)
            prefix = source.read(16)
            source.seek(0)
    except (OSError, ValueError):
        prefix = b""
    refused = refused_format(prefix)
    if refused:
        return f"image format not accepted (looks like {refused}; accepted: {SHOWN_FORMATS})"
    return "not an image (cannot identify image file)"


def refused_format(prefix: bytes) -> str | None:
    """The Pillow format outside ACCEPTED_FORMATS whose signature `prefix` carries, if any. Only the plugins'
    signature checks run (comparisons of a few bytes), never their parsers."""
    Image.init()
    for name, (_, accepts) in Image.OPEN.items():
        if name in ACCEPTED_FORMATS or accepts is None:
            continue
        try:
            if accepts(prefix):
                return name
        except Exception:  # noqa: BLE001 - a signature check that cannot read this prefix does not match it
            continue
    return None


def _refuse_bomb(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        if width * height > MAX_PIXELS:
            raise ImageUnreadable(f"decompression bomb ({width} x {height} pixels)")
        raise ImageUnreadable(f"too many pixels ({width} x {height}, over the limit of {max_pixels:,})")
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise ImageUnreadable(f"extreme aspect ratio ({width} x {height} pixels)")


def _short(err: BaseException) -> str:
    return str(err).splitlines()[0][:80] if str(err) else type(err).__name__


def reduction_factor(size: tuple[int, int]) -> int:
    """The largest whole factor that keeps the short side at least REDUCED_SHORT_SIDE (1: left as it is)."""
    return max(1, min(size) // REDUCED_SHORT_SIDE)


def _decoded(image: Image.Image) -> Image.Image:
    """A loaded image reduced (when large) and converted to RGB, detached from its file."""
    factor = reduction_factor(image.size)
    if factor > 1:
        image = _reducible(image).reduce(factor)
    rgb = to_rgb(image)
    return rgb.copy() if rgb is image else rgb


def _reducible(image: Image.Image) -> Image.Image:
    """Pillow's reduce averages values: palette indices and bits must become colours and greys first, and it has no
    16-bit path (32-bit holds every 16-bit value)."""
    if image.mode in ("P", "PA"):
        return image.convert("RGBA")
    if image.mode == "1":
        return image.convert("L")
    if image.mode.startswith("I;16"):
        return image.convert("I")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha composited on white, 16/32-bit and float greys scaled to 0..255
    (grey_to_uint8); ImageUnreadable for a mode Pillow cannot convert."""
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # applies the palette's transparency, if any
    elif image.mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts these only to their plain forms
        image = image.convert(image.mode[:-1] + "A")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(grey_to_uint8(np.asarray(image), image.mode)).convert("RGB")
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageUnreadable(f"unsupported image mode {image.mode} ({_short(err)})") from None


def grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """One band of 16-bit, 32-bit or float greys as 8 bits, by the first range that holds every (finite) value:
    16-bit modes 0..65535; 32-bit ints 0..255, else 0..65535; floats 0..1, else 0..255. Values outside all of
    them are stretched from their lowest to their highest, and a flat image of such values keeps its value, clipped
    to 0..255 (it becomes a flat grey, black or white). NaN is the lowest value, infinities the extremes.
    Computed a band of rows at a time in float32, so no copy of the whole image is ever made in floating point."""
    low, high = _finite_range(values)
    offset, scale = _grey_scale(mode, low, high)
    out = np.empty(values.shape, dtype=np.uint8)
    rows = max(1, GREY_CHUNK_PIXELS // max(1, values.shape[-1] if values.ndim > 1 else 1))
    for start in range(0, values.shape[0], rows):
        band = values[start:start + rows].astype(np.float32)
        if values.dtype.kind == "f":
            np.nan_to_num(band, copy=False, nan=low, posinf=high, neginf=low)
        band -= np.float32(offset)
        band *= np.float32(scale)
        np.clip(np.rint(band, out=band), 0, 255, out=band)
        out[start:start + rows] = band
    return out


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    """(lowest, highest) finite value, without a copy of the whole array; (0, 0) when there is none."""
    if values.dtype.kind != "f":
        return (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    low, high = np.inf, -np.inf
    rows = max(1, GREY_CHUNK_PIXELS // max(1, values.shape[-1] if values.ndim > 1 else 1))
    for start in range(0, values.shape[0], rows):
        band = values[start:start + rows]
        finite = band[np.isfinite(band)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    return (low, high) if low <= high else (0.0, 0.0)


def _grey_scale(mode: str, low: float, high: float) -> tuple[float, float]:
    """(offset, scale) taking the image's values to 0..255 (grey_to_uint8's ranges)."""
    if mode.startswith("I;16"):
        return 0.0, 1 / 257
    nominal = ((1.0, 255.0), (255.0, 1.0)) if mode == "F" else ((255.0, 1.0), (65535.0, 1 / 257))
    for top, scale in nominal:
        if low >= 0 and high <= top:
            return 0.0, scale
    if high > low:
        return low, 255.0 / (high - low)
    return 0.0, 1.0  # flat and outside every range: its own value, clipped


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
