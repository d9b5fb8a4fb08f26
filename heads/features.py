"""In-memory features for training heads: each modality is a token sequence with a mask (pooled = one token)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from fusion.errors import CacheError
from fusion.labels import SPLITS


@dataclass
class Modality:
    tokens: Tensor  # (N, L, D) float32; token 0 is the modality's pooled embedding (BERT CLS, DINOv2 global)
    mask: Tensor  # (N, L) bool, True = a real token; token 0 is always real

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    @property
    def pooled(self) -> bool:
        return self.tokens.shape[1] == 1

    def rows(self, index: Tensor | slice) -> "Modality":
        if isinstance(index, slice):
            return Modality(self.tokens[index], self.mask[index])
        # index_select is ~2x faster than advanced indexing for a minibatch gather
        return Modality(self.tokens.index_select(0, index), self.mask.index_select(0, index))


@dataclass
class SplitFeatures:
    text: Modality
    image: Modality
    label: Tensor  # (N,) long
    ids: list[str] | None = None  # the cache's sample ids (features_from_cache), kept to name test predictions

    def __len__(self) -> int:
        return self.label.shape[0]

    @property
    def dims(self) -> tuple[int, int]:
        return self.text.dim, self.image.dim

    @property
    def tokens_per_row(self) -> int:
        return self.text.tokens.shape[1] + self.image.tokens.shape[1]

    def batches(self, selections: Iterable[Tensor | slice]) -> Iterator["SplitFeatures"]:
        """rows() of each selection in turn (a split on disk reads ahead while the caller computes)."""
        return (self.rows(selection) for selection in selections)

    def latents_only(self) -> "SplitFeatures":
        """Token 0 of each modality: all that heads without cross-modal attention read (views, no copy)."""
        return SplitFeatures(Modality(self.text.tokens[:, :1], self.text.mask[:, :1]),
                             Modality(self.image.tokens[:, :1], self.image.mask[:, :1]), self.label, self.ids)

    def rows(self, index: Tensor | slice) -> "SplitFeatures":
        label = self.label[index] if isinstance(index, slice) else self.label.index_select(0, index)
        return SplitFeatures(self.text.rows(index), self.image.rows(index), label)


def pooled_modality(vectors: Tensor | np.ndarray) -> Modality:
    """(N, D) vectors as one-token sequences with an all-True mask."""
    tokens = _float_tensor(vectors).unsqueeze(1)
    return Modality(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool))


def _float_tensor(values) -> Tensor:
    if isinstance(values, Tensor):
        return values.to(torch.float32)
    return torch.as_tensor(np.asarray(values), dtype=torch.float32)


def split_features(text, image, label) -> SplitFeatures:
    """Pooled features from (N, Dt) text, (N, Di) image and (N,) label arrays (numpy or torch)."""
    label = label.long() if isinstance(label, Tensor) else torch.as_tensor(np.asarray(label), dtype=torch.long)
    return SplitFeatures(pooled_modality(text), pooled_modality(image), label)


def features_from_cache(data, *, tokens: bool = False) -> dict[str, SplitFeatures]:
    """float16 cache arrays -> float32 tensors, per split present in `data.splits` (fusion.cache.reader.CacheData).

    tokens=True uses the cached sequences (`text_tokens`/`text_mask`, `image_tokens`) for real cross-modal attention;
    token 0 of each sequence is replaced by the pooled embedding, so the modality latents T and V are exactly the
    paper's (BERT's CLS and DINOv2's layer-normed CLS) whatever the encoder put first.
    """
    features = {}
    for name in SPLITS:
        if name in data.splits:
            arrays = data.splits[name]
            features[name] = _token_split(arrays, name) if tokens else split_features(arrays.text, arrays.image,
                                                                                      arrays.label)
            features[name].ids = [str(id_) for id_ in arrays.id]
    if "train" not in features or "val" not in features:
        raise CacheError(f"{getattr(data, 'path', 'cache')}: training needs the train and val splits, "
                         f"found {', '.join(sorted(data.splits)) or 'none'}")
    return features


def _token_split(arrays, split: str) -> SplitFeatures:
    if arrays.text_tokens is None or arrays.image_tokens is None or arrays.text_mask is None:
        raise CacheError(f"split {split} has no token sequences: extract the cache with --tokens")
    return token_features(arrays.text_tokens, arrays.text_mask, arrays.image_tokens, arrays.text, arrays.image,
                          arrays.label)


def token_features(text_tokens, text_mask, image_tokens, text, image, label) -> SplitFeatures:
    """Cached sequences (numpy or torch) with the pooled text and image embeddings put in as their token 0."""
    label = label.long() if isinstance(label, Tensor) else torch.as_tensor(np.asarray(label), dtype=torch.long)
    image_mask = np.ones(image_tokens.shape[:2], dtype=bool)
    return SplitFeatures(token_modality(text_tokens, text_mask, text), token_modality(image_tokens, image_mask, image),
                         label)


def token_modality(tokens, mask, pooled) -> Modality:
    """(N, L, D) cached tokens (float16 or float32), their (N, L) mask and (N, D) pooled embeddings -> a float32
    Modality whose token 0 is the pooled embedding and always counts as real."""
    sequence = torch.as_tensor(np.asarray(tokens), dtype=torch.float32)
    sequence[:, 0] = torch.as_tensor(np.asarray(pooled), dtype=torch.float32)
    valid = torch.as_tensor(np.asarray(mask), dtype=torch.bool).clone()
    valid[:, 0] = True  # the latent itself is never padding, so no attention row is ever all masked
    return Modality(sequence, valid)
