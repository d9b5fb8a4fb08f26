"""Dual encoders (CLIP, SigLIP and their family): one checkpoint, two towers, one shared embedding space.

Such a model's features are its own `get_text_features` / `get_image_features` (recorded as pooling `projected`); its
tokenizer and image processor come from its AutoProcessor (extract/encoders.py loads them, and loads the model once
when it serves both modalities). With --tokens the towers' last hidden states would be available, but the heads put
the pooled vector in as token 0 of each sequence, which needs the tokens' width and space, so that is refused
(extract/pooling.py check_token_widths).
"""

from __future__ import annotations

import torch

# SigLIP's text tower pools its last position and was trained on texts padded to its full length (64 tokens), as its
# model card says to call it; CLIP pools its end-of-text token, so CLIP texts pad to the batch's longest like BERT's.
PADDED_TO_FULL_LENGTH = {"siglip"}
SENTINEL_LENGTH = 1_000_000  # tokenizers saved without a limit report a huge model_max_length


def is_dual(model: torch.nn.Module) -> bool:
    """A two-tower model with features for both modalities in one space."""
    return callable(getattr(model, "get_text_features", None)) and callable(getattr(model, "get_image_features", None))


def text_config(model: torch.nn.Module):
    """The text tower's config (max_position_embeddings lives there in a dual model's config)."""
    return getattr(model.config, "text_config", None) or model.config


def full_text_length(model: torch.nn.Module, tokenizer) -> int | None:
    """The length texts are padded to for a model that pools a fixed position (SigLIP); None for the others."""
    if getattr(model.config, "model_type", None) not in PADDED_TO_FULL_LENGTH:
        return None
    limits = [getattr(text_config(model), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < SENTINEL_LENGTH]
    return min(limits) if limits else None


def projected_text(model: torch.nn.Module, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                   length: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """get_text_features on texts padded as the model expects, with the inputs its tokenizer gives (SigLIP's may have
    no attention mask); returns (features, the tower's last hidden states or None on older transformers)."""
    if length is not None and input_ids.shape[1] < length:
        extra = length - input_ids.shape[1]
        input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=int(tokenizer.pad_token_id))
        attention_mask = torch.nn.functional.pad(attention_mask, (0, extra), value=0)
    inputs = {"input_ids": input_ids}
    if "attention_mask" in getattr(tokenizer, "model_input_names", ("attention_mask",)):
        inputs["attention_mask"] = attention_mask
    return _features(model.get_text_features(**inputs))


def projected_image(model: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _features(model.get_image_features(pixel_values=pixel_values))


def _features(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers 5 returns the tower's output with the projected features as pooler_output; 4.x the tensor."""
    if isinstance(output, torch.Tensor):
        return output, None
    return output.pooler_output, getattr(output, "last_hidden_state", None)


def projected_widths(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """(text, image) feature widths, read off one tiny forward: projection heads are named and sized differently
    across the family (CLIP's projection_dim, SigLIP's head), and the forward is what the cache will hold."""
    vision = getattr(model.config, "vision_config", model.config)
    side = int(getattr(vision, "image_size", 224))
    channels = int(getattr(vision, "num_channels", 3))
    with torch.inference_mode():
        text, _ = _features(model.get_text_features(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device)))
        image, _ = projected_image(model, torch.zeros((1, channels, side, side), dtype=dtype, device=device))
    return int(text.shape[-1]), int(image.shape[-1])
