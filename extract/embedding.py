"""The embedding of a batch of posts, in the cache's format. Extraction writes these arrays and prediction feeds them
to a head, so the head always sees what training saw (one function, no second copy to drift)."""

from __future__ import annotations

import numpy as np
import torch

from fusion.extract.batches import pad_token_ids
from fusion.extract.encoders import Encoders, image_embeddings, text_embeddings


def embed_posts(encoders: Encoders, token_ids: list[list[int]], pixels: torch.Tensor, *,
                with_tokens: bool, on_host: bool = True) -> dict[str, np.ndarray]:
    """Posts (token ids, pixels from `encoders.pixels`, same order) -> `text`, `image` (float16) and, with_tokens,
    the whole sequences `text_tokens` (cut to the batch's longest text), `text_mask` and `image_tokens`.

    on_host=False leaves them as float16 tensors on the device, for `to_host` on another thread (the extraction's
    writer), so the forward thread does not wait for the copy."""
    input_ids, attention_mask = pad_token_ids(token_ids, encoders.tokenizer.pad_token_id, encoders.pad_multiple)
    longest = int(attention_mask.sum(1).max())  # token arrays are stored without the rounding's extra padding
    device, non_blocking = encoders.device, encoders.device.type == "cuda"
    with torch.inference_mode():
        text, text_tokens = text_embeddings(encoders, input_ids.to(device, non_blocking=non_blocking),
                                            attention_mask.to(device, non_blocking=non_blocking))
        image, image_tokens = image_embeddings(encoders, encoders.model_pixels(pixels))
    arrays = {"text": to_float16(text), "image": to_float16(image)}
    if with_tokens:
        arrays.update(text_tokens=to_float16(text_tokens[:, :longest]), text_mask=attention_mask[:, :longest].bool(),
                      image_tokens=to_float16(image_tokens))
    return to_host(arrays) if on_host else arrays


def to_float16(tensor: torch.Tensor) -> torch.Tensor:
    """Rounded on the device (the same round-to-nearest-even as numpy), so half as many bytes cross to the host."""
    return tensor.to(torch.float16)


def to_host(arrays: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.cpu().numpy() for name, tensor in arrays.items()}
