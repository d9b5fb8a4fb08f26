"""Tiny randomly initialised encoders made from real transformers configs, saved with save_pretrained so that tests
load them through the same `from_pretrained` path as real model names."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, Dinov2Config, Dinov2Model
from transformers.models.bit.image_processing_bit import BitImageProcessor

# Enough word pieces for the generated test texts; everything else becomes [UNK] or is split into letters.
WORDS = ("good great happy love fun nice bad sad hate awful terrible not no the a is it this that day meme cat dog "
         "today so very really what when my you i we").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert(folder: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,!?'#@:-")
    vocab = SPECIAL + WORDS + letters + ["##" + ch for ch in letters]
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def write_tiny_dinov2(folder: Path, *, hidden: int = 24, image_size: int = 28, seed: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          patch_size=14, image_size=image_size)
    Dinov2Model(config).save_pretrained(folder)
    # The same processor class and settings family as facebook/dinov2-small, shrunk to the tiny image size.
    BitImageProcessor(size={"shortest_edge": image_size + 4}, crop_size={"height": image_size, "width": image_size},
                      do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def extract_argv(root: Path, out: Path, models: tuple[Path, Path], *extra: str,
                 dataset: str = "mvsa-single") -> list[str]:
    """`fusion extract` arguments for a test dataset with the tiny encoders, on the CPU, decoding in-process."""
    bert, dinov2 = models
    return ["extract", "--dataset", dataset, "--root", str(root), "--out", str(out), "--text-model", str(bert),
            "--image-model", str(dinov2), "--device", "cpu", "--workers", "0", *extra]
