"""Synthetic in-memory features for the head tests: tasks whose right answer is known."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from fusion.heads.features import Modality, SplitFeatures, split_features

SPLIT_SIZES = {"train": 1200, "val": 400, "test": 600}


def xor_features(sizes: dict[str, int] = SPLIT_SIZES, text_dim: int = 6, image_dim: int = 4, seed: int = 0):
    """Label positive when sign(text_0) == sign(image_0), else negative: neither modality alone says anything."""
    generator = torch.Generator().manual_seed(seed)
    features = {}
    for split, n in sizes.items():
        text, image = torch.randn(n, text_dim, generator=generator), torch.randn(n, image_dim, generator=generator)
        label = torch.where((text[:, 0] > 0) == (image[:, 0] > 0), 2, 0)
        features[split] = split_features(text, image, label)
    return features


def gaussian_features(sizes: dict[str, int] = SPLIT_SIZES, text_dim: int = 4, image_dim: int = 4,
                      separation: float = 1.1, seed: int = 0):
    """Three equal-prior classes, x = [text ; image] ~ N(mu_c, I), the means spread over both modalities.

    Returns (features, bayes_accuracy): the accuracy on the test split of the Bayes-optimal rule, which for equal
    priors and an identity covariance picks the nearest true mean.
    """
    generator = torch.Generator().manual_seed(seed)
    means = torch.zeros(3, text_dim + image_dim)
    for label, angle in enumerate((0.0, 2 * math.pi / 3, 4 * math.pi / 3)):
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        means[label, 0:2] = separation * direction  # text carries part of the signal ...
        means[label, text_dim:text_dim + 2] = separation * direction.flip(0)  # ... the image the rest
    features, bayes = {}, None
    for split, n in sizes.items():
        label = torch.randint(0, 3, (n,), generator=generator)
        x = means[label] + torch.randn(n, text_dim + image_dim, generator=generator)
        features[split] = split_features(x[:, :text_dim], x[:, text_dim:], label)
        if split == "test":
            bayes = float((torch.cdist(x, means).argmin(dim=1) == label).float().mean())
    return features, bayes


def token_split(n: int, text_len: int, image_len: int, text_dim: int = 6, image_dim: int = 4,
                seed: int = 0) -> SplitFeatures:
    """Random token sequences; text has 1..text_len real tokens (the rest padding), label from token means."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(n, text_len, text_dim, generator=generator)
    image = torch.randn(n, image_len, image_dim, generator=generator)
    lengths = torch.randint(1, text_len + 1, (n,), generator=generator)
    mask = torch.arange(text_len).unsqueeze(0) < lengths.unsqueeze(1)
    label = torch.randint(0, 3, (n,), generator=generator)
    return SplitFeatures(Modality(text, mask), Modality(image, torch.ones(n, image_len, dtype=torch.bool)), label)


def stand_in_cache(sizes: dict[str, int], text_dim: int = 6, image_dim: int = 4, tokens: bool = False, seed: int = 0):
    """An object shaped like fusion.cache.reader.CacheData (float16 arrays), for features_from_cache."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in sizes.items():
        arrays = SimpleNamespace(text=rng.standard_normal((n, text_dim)).astype(np.float16),
                                 image=rng.standard_normal((n, image_dim)).astype(np.float16),
                                 label=rng.integers(0, 3, n).astype(np.int64),
                                 id=np.array([f"{split}-{i}" for i in range(n)]),
                                 text_tokens=None, text_mask=None, image_tokens=None)
        if tokens:
            arrays.text_tokens = rng.standard_normal((n, 5, text_dim)).astype(np.float16)
            arrays.text_mask = np.arange(5)[None, :] < rng.integers(1, 6, n)[:, None]
            arrays.image_tokens = rng.standard_normal((n, 3, image_dim)).astype(np.float16)
        splits[split] = arrays
    return SimpleNamespace(path="stand-in.h5", attrs={}, splits=splits, skipped=[])
