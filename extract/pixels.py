"""Image preprocessing in two halves: the geometry (resize, centre crop) in the decode workers as uint8, the arithmetic
(rescale, normalise) on the encoders' device.

A uint8 crop is a quarter of the bytes of the float32 pixels an image processor returns, through the workers' shared
memory, the pinned copy and the host-to-device transfer. The split is only used where it reproduces the processor:
when the encoders load, the processor's full path and the two halves are run on probe images and compared. A processor
the halves do not reproduce (other steps, another order, no such switches) runs its own full float path in the workers
instead. Which of the two ran is part of the preprocessing recorded in the cache fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

SPLIT = "uint8 resize+crop in workers, rescale+normalize on the device"
WHOLE = "the image processor's float path in workers"
# Probe images: a landscape larger than any usual crop and a small portrait, so both down- and up-scaling are seen.
PROBE_SHAPES = ((301, 407), (97, 63))
# The halves compute rescale and normalise in float32 on the device, the processor in numpy; both round differently
# at the last bit (about 1e-6 on values of a few units), never by more.
PROBE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PixelPipeline:
    processor: object
    split: bool
    scale: float | None = None  # None: no rescaling
    mean: tuple[float, ...] | None = None  # None: no normalisation
    std: tuple[float, ...] | None = None

    @classmethod
    def for_processor(cls, processor) -> "PixelPipeline":
        """The split pipeline where it reproduces `processor` on the probe images, else the processor's own path."""
        split = _split_pipeline(processor)
        if split is not None and _reproduces(split):
            return split
        return cls(processor=processor, split=False)

    def describe(self) -> str:
        return SPLIT if self.split else WHOLE

    def crop(self, image: Image.Image) -> torch.Tensor:
        """One decoded RGB image -> CHW pixels as the workers ship them (uint8 when split, else the processor's)."""
        if not self.split:
            return self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return self.processor(images=image, do_rescale=False, do_normalize=False,
                              return_tensors="pt")["pixel_values"][0]

    def model_input(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Pixels as the image model takes them, computed where `pixels` already are (the encoders' device)."""
        if pixels.dtype != torch.uint8:
            return pixels.to(dtype)
        values = pixels.to(torch.float32)
        if self.scale is not None:
            values = values * self.scale
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=values.device).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=values.device).view(-1, 1, 1)
            values = (values - mean) / std
        return values.to(dtype)

    def bytes_per_image(self, image_size: int) -> int:
        """What one image weighs in shared memory (a square crop of `image_size`, 224 when unknown)."""
        side = image_size or 224
        return 3 * side * side * (1 if self.split else 4)


def _split_pipeline(processor) -> PixelPipeline | None:
    """The halves a processor's own switches describe, or None when it has no such switches."""
    do_rescale, do_normalize = getattr(processor, "do_rescale", None), getattr(processor, "do_normalize", None)
    if not isinstance(do_rescale, bool) or not isinstance(do_normalize, bool):
        return None
    scale = getattr(processor, "rescale_factor", None) if do_rescale else None
    mean, std = (getattr(processor, "image_mean", None), getattr(processor, "image_std", None)) if do_normalize \
        else (None, None)
    try:
        scale = None if scale is None else float(scale)
        mean = None if mean is None else tuple(float(v) for v in np.atleast_1d(mean))
        std = None if std is None else tuple(float(v) for v in np.atleast_1d(std))
    except (TypeError, ValueError):
        return None
    if (do_rescale and scale is None) or (do_normalize and (mean is None or std is None)):
        return None
    return PixelPipeline(processor=processor, split=True, scale=scale, mean=mean, std=std)


def _reproduces(split: PixelPipeline) -> bool:
    rng = np.random.default_rng(0)
    for height, width in PROBE_SHAPES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        try:
            whole = split.processor(images=image, return_tensors="pt")["pixel_values"][0]
            crop = split.crop(image)
        except Exception:  # noqa: BLE001 - any processor that cannot run its halves apart keeps its own path
            return False
        if crop.dtype != torch.uint8 or crop.shape != whole.shape or not whole.is_floating_point():
            return False
        if (split.model_input(crop, torch.float32) - whole.float()).abs().max() > PROBE_TOLERANCE:
            return False
    return True


def visible_box(processor, width: int, height: int) -> dict[str, float]:
    """The part of a `width` x `height` image that the image encoder sees, as fractions of the image ("left", "top",
    "width", "height"): where an explanation's patch grid lies on the picture. It follows the processor's own
    settings: a resize of the shortest edge (DINOv2, CLIP) or to a fixed height and width (which stretches the whole
    image), then a centre crop; a processor with neither shows the whole image."""
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    resized_w, resized_h = float(width), float(height)
    if getattr(processor, "do_resize", False):
        if _setting(size, "shortest_edge"):
            scale = _setting(size, "shortest_edge") / max(min(width, height), 1)
            resized_w, resized_h = width * scale, height * scale
        elif _setting(size, "height") and _setting(size, "width"):
            resized_w, resized_h = float(_setting(size, "width")), float(_setting(size, "height"))
    seen_w = seen_h = 1.0
    if getattr(processor, "do_center_crop", False) and _setting(crop, "height") and _setting(crop, "width"):
        seen_w, seen_h = min(1.0, _setting(crop, "width") / resized_w), min(1.0, _setting(crop, "height") / resized_h)
    return {"left": (1 - seen_w) / 2, "top": (1 - seen_h) / 2, "width": seen_w, "height": seen_h}


def _setting(sizes, key: str) -> int | None:
    """One entry of a processor's size settings: a dict in older transformers, a SizeDict (attributes) in newer."""
    value = sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None
