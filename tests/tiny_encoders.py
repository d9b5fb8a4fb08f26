"""More tiny randomly initialised encoders (beside tests/tiny_models.py): a RoBERTa-style text model, DINOv2 with
registers, and the dual encoders CLIP and SigLIP, each saved with save_pretrained together with its tokenizer and
processor, so that `fusion extract` loads them as it would a hub checkpoint.

SigLIP's own tokenizer (SiglipTokenizer) needs the sentencepiece and protobuf packages, which the test environment does
not install; the tiny SigLIP is saved with a SiglipProcessor whose tokenizer is a tiny T5Tokenizer (a Unigram model of
the same family, built offline by the `tokenizers` library), with SigLIP's settings: </s> for padding, 64 tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersModel, RobertaConfig, RobertaModel,
                          RobertaTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor,
                          T5Tokenizer)
from transformers.models.bit.image_processing_bit import BitImageProcessor

LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,!?'#@:-")
IMAGE_SIZE = 28


def write_tiny_roberta(folder: Path, *, hidden: int = 32, positions: int = 40, seed: int = 2) -> Path:
    """RoBERTa: <s> first (its CLS), positions numbered from padding_idx + 1, byte-level BPE without merges."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + sorted(ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(tokens)}
    RobertaTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=2 * hidden, max_position_embeddings=positions, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def write_tiny_dinov2_registers(folder: Path, *, hidden: int = 24, registers: int = 4, seed: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Dinov2WithRegistersConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                       patch_size=14, image_size=IMAGE_SIZE, num_register_tokens=registers)
    Dinov2WithRegistersModel(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": IMAGE_SIZE + 4}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                      do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def write_tiny_clip(folder: Path, *, seed: int = 4) -> Path:
    """CLIP: BPE tokenizer (letters only, no merges), text pooled at its end-of-text token, projections to 16."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(["<|startoftext|>", "<|endoftext|>"] + LETTERS +
                                                [letter + "</w>" for letter in LETTERS])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE + 4},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=14),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    return folder


def write_tiny_siglip(folder: Path, *, seed: int = 5) -> Path:
    """SigLIP: text pooled at its last position (so padded to 64 tokens), vision pooled by attention; widths 32/24."""
    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(letter, -2.0) for letter in LETTERS] + [("\u2581" + letter, -1.5) for letter in LETTERS]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, pad_token="</s>", model_max_length=64)
    processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    SiglipProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(seed)
    config = SiglipConfig(text_config=dict(vocab_size=len(pieces), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                                           pad_token_id=1, eos_token_id=1, bos_token_id=None),
                          vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=14))
    SiglipModel(config).save_pretrained(folder)
    return folder
