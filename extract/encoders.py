"""The frozen encoders: load by Hugging Face name or local path, and pool as the paper does or as asked.

Text: BERT's CLS embedding of the last hidden layer (before BERT's pooler). Image: DINOv2's global embedding, the
layer-normed CLS token (`pooler_output`). Any model loadable with AutoModel works; extract/pooling.py holds the other
poolings (mean, cls+mean) and extract/dual.py the dual encoders (CLIP, SigLIP), whose features are their own
get_text_features / get_image_features. The pooling names go into the cache.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

import torch
import transformers
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer

from fusion.device import autocast, encoder_dtypes, resolve_device, use_device
from fusion.errors import ModelLoadError, install_extra
from fusion.extract.dual import (full_text_length, is_dual, projected_image, projected_text, projected_widths,
                                 text_config)
from fusion.extract.images import DECODING
from fusion.extract.pooling import PROJECTED, pool_image, pool_text, prefix_tokens, recorded_pooling, resolve_pooling
from fusion.extract.pixels import PixelPipeline
from fusion.paper import IMAGE_MODEL, TEXT_MODEL



@dataclass
class Encoders:
    text_model: torch.nn.Module
    tokenizer: object
    image_model: torch.nn.Module
    image_processor: object
    device: torch.device
    dtype: torch.dtype  # of the weights and of the pixel inputs
    text_name: str
    image_name: str
    text_revision: str
    image_revision: str
    autocast_dtype: torch.dtype | None = None  # bf16 on CPU: matrix products in bf16, norms and sums in fp32
    text_pooling: str = "cls"  # extract/pooling.py TEXT_POOLINGS
    image_pooling: str = "cls"  # extract/pooling.py IMAGE_POOLINGS
    text_length: int | None = None  # texts padded to this many tokens (SigLIP; extract/dual.py)

    @property
    def pad_multiple(self) -> int:
        """Texts are padded to a multiple of 8 under CPU autocast: oneDNN keeps the kernels it builds for every
        input shape it meets (about 9 MB each for BERT-base), so one shape per text length would grow memory by up
        to 1 GB over a run; 16 lengths cap it. fp32 (MKL) and GPU runs keep no such cache and pad to the longest."""
        return 8 if self.autocast_dtype is not None and self.device.type == "cpu" else 1

    def autocast(self):
        """The precision context both forwards run in (a no-op unless autocast_dtype is set: bf16 on a CPU)."""
        return autocast("fp32" if self.autocast_dtype is None else "bf16", self.device)

    @property
    def text_dim(self) -> int:
        if self.text_pooling == PROJECTED:
            return self._projected_widths(self.text_model)[0]
        return self.text_model.config.hidden_size

    @property
    def image_dim(self) -> int:
        if self.image_pooling == PROJECTED:
            return self._projected_widths(self.image_model)[1]
        return self.image_model.config.hidden_size * (2 if self.image_pooling == "cls+mean" else 1)

    @cached_property
    def _widths(self) -> dict[int, tuple[int, int]]:
        return {}

    def _projected_widths(self, model: torch.nn.Module) -> tuple[int, int]:
        if id(model) not in self._widths:
            with self.autocast():
                self._widths[id(model)] = projected_widths(model, self.device, self.dtype)
        return self._widths[id(model)]

    def token_shapes(self, max_length: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((text tokens, width), (image tokens, width)) of one row's --tokens sequences at most: texts padded to
        `max_length`, and the ViT's prefix tokens (CLS, registers) plus one token per patch."""
        config = self.image_model.config
        patch = getattr(config, "patch_size", None) or getattr(getattr(config, "vision_config", None), "patch_size", 14)
        side = self.image_size // int(patch)
        return (max_length, self.text_dim), (prefix_tokens(config) + side * side, self.image_dim)

    @property
    def recorded_pooling(self) -> dict[str, str]:
        """The cache attributes `text_pooling` and `image_pooling` (the paper's: cls and cls_layernorm)."""
        return {"text_pooling": recorded_pooling("text", self.text_pooling),
                "image_pooling": recorded_pooling("image", self.image_pooling)}

    @property
    def image_size(self) -> int:
        processor = self.image_processor
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        size = crop or getattr(processor, "size", None)
        if isinstance(size, (int, float)):
            return int(size)
        return int(_field(size, "height") or _field(size, "shortest_edge") or 0)

    @cached_property
    def pixels(self) -> PixelPipeline:
        """How images become pixels: uint8 crops from the workers normalised on the device, where that reproduces
        the processor (extract/pixels.py)."""
        return PixelPipeline.for_processor(self.image_processor)

    def model_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels from the workers (uint8 crops or the processor's floats) on the device, as the image model takes
        them."""
        return self.pixels.model_input(pixels.to(self.device, non_blocking=self.device.type == "cuda"), self.dtype)

    def preprocessing(self) -> dict:
        """Everything about preprocessing that changes the embeddings (goes into the cache fingerprint)."""
        return {"image_processor": _jsonable(self.image_processor.to_dict()),
                "pixels": self.pixels.describe(), "decoding": DECODING,
                "tokenizer": type(self.tokenizer).__name__,
                "do_lower_case": bool(getattr(self.tokenizer, "do_lower_case", False))}


def _field(size, key: str):
    """Processors keep sizes as dicts or SizeDict objects depending on the transformers version."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _jsonable(config: dict) -> dict:
    return {k: v if isinstance(v, (str, int, float, bool, list, dict, type(None))) else str(v)
            for k, v in sorted(config.items())}


def quiet_transformers() -> None:
    """Hide transformers' own progress bars and advisory warnings; fusion's messages say what matters."""
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_encoders(text_model: str = TEXT_MODEL, image_model: str = IMAGE_MODEL, *,
                  device: str = "auto", precision: str = "fp32", trust_remote_code: bool = False,
                  text_pooling: str | None = None, image_pooling: str | None = None) -> Encoders:
    """The two encoders, frozen on `device`; a checkpoint named for both (a dual encoder) is loaded once. Pooling
    None: the paper's (cls), or projected for a dual encoder (extract/pooling.py)."""
    target = resolve_device(device)
    dtype, autocast_dtype = encoder_dtypes(target, precision)
    use_device(target)
    # A local folder's weights are hashed (model_revision) on a second thread while the models load: hashlib lets
    # go of Python's lock, so the hash costs no start-up time.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="fusion-hash") as hashing:
        digests = [hashing.submit(folder_digest, name) for name in (text_model, image_model)]
        text = _from_pretrained(AutoModel, text_model, "text model", trust_remote_code)
        image = text if same_checkpoint(text_model, image_model) else _from_pretrained(
            AutoModel, image_model, "image model", trust_remote_code)
        text_revision, image_revision = (model_revision(model, digest.result())
                                         for model, digest in zip((text, image), digests))
    text_pooling = resolve_pooling("text", text_pooling, dual=is_dual(text), model=text_model)
    image_pooling = resolve_pooling("image", image_pooling, dual=is_dual(image), model=image_model)
    tokenizer, image_processor = _preprocessors(text_model, image_model, text_pooling == PROJECTED,
                                                image_pooling == PROJECTED, trust_remote_code)
    return Encoders(
        text_model=_frozen(text, target, dtype, autocast_dtype),
        tokenizer=tokenizer,
        image_model=_frozen(image, target, dtype, autocast_dtype),
        image_processor=image_processor,
        device=target, dtype=dtype, text_name=canonical_name(text_model), image_name=canonical_name(image_model),
        text_revision=text_revision, image_revision=image_revision, autocast_dtype=autocast_dtype,
        text_pooling=text_pooling, image_pooling=image_pooling,
        text_length=full_text_length(text, tokenizer) if text_pooling == PROJECTED else None)


def same_checkpoint(text_model: str, image_model: str) -> bool:
    return canonical_name(text_model) == canonical_name(image_model)


def _preprocessors(text_model: str, image_model: str, text_dual: bool, image_dual: bool,
                   trust_remote_code: bool) -> tuple[object, object]:
    """(tokenizer, image processor): a dual encoder's from its AutoProcessor (read once when it serves both)."""
    processors: dict[str, object] = {}

    def processor(name: str):
        if canonical_name(name) not in processors:
            processors[canonical_name(name)] = _from_pretrained(AutoProcessor, name, "processor", trust_remote_code,
                                                                backend="pil")
        return processors[canonical_name(name)]

    tokenizer = (processor(text_model).tokenizer if text_dual
                 else _from_pretrained(AutoTokenizer, text_model, "tokenizer", trust_remote_code))
    image_processor = (processor(image_model).image_processor if image_dual
                       else _from_pretrained(AutoImageProcessor, image_model, "image processor", trust_remote_code,
                                             backend="pil"))
    return tokenizer, image_processor


def fit_max_length(encoders: Encoders, max_length: int) -> int:
    """`max_length`, lowered to what the text model has positions for: a longer input would crash its embedding
    layer mid-run (the cache records the length actually used, so a rerun with the same arguments resumes)."""
    positions = getattr(text_config(encoders.text_model), "max_position_embeddings", None)
    # RoBERTa-style models (XLM-R, CamemBERT) number positions from padding_idx + 1: that many fewer real positions.
    padding_idx = getattr(getattr(encoders.text_model, "embeddings", None), "padding_idx", None)
    if isinstance(positions, int) and isinstance(padding_idx, int) and encoders.text_pooling != PROJECTED:
        positions -= padding_idx + 1
    limits = [positions, getattr(encoders.tokenizer, "model_max_length", None)]
    # Tokenizers saved without a limit report a huge sentinel (about 1e30); only real limits count.
    limits = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000]
    return min([max_length, *limits])


def canonical_name(name: str) -> str:
    """A local folder is recorded as an absolute path, so the cache still names it from another directory."""
    local = Path(name).expanduser()
    return str(local.resolve()) if local.is_dir() else name


AUTOCAST_WEIGHTED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _frozen(model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
            autocast_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Under autocast, the layers whose weights autocast would cast on every call hold them cast once instead:
    the same numbers (a cast is a cast), without re-reading 130 M fp32 weights every batch."""
    model.eval().requires_grad_(False)
    model = model.to(device=device, dtype=dtype)
    if autocast_dtype is not None:
        for module in model.modules():
            if isinstance(module, AUTOCAST_WEIGHTED):
                module.to(autocast_dtype)
    return model


def _from_pretrained(loader, name: str, what: str, trust_remote_code: bool, **kwargs):
    """Load from a local folder, the Hugging Face cache, or the hub; every failure becomes one actionable line."""
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{what} {name!r}: a path to a file was given; point at the model's folder")
    if name.startswith(("/", ".", "~")) and not local.exists():
        raise ModelLoadError(f"{what} {name!r}: no such folder")
    source = str(local) if local.is_dir() else name
    try:
        # Try the local cache first: offline, the hub lookup would retry for half a minute before failing.
        return loader.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs)
    except pickle.UnpicklingError as error:
        raise _unsafe_pickle(what, name) from error
    except ImportError as error:  # a tokenizer whose library is not installed (SigLIP's needs sentencepiece)
        raise _missing_package(what, name, error) from None
    except (OSError, ValueError) as cached_error:
        if local.is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise _missing(what, name, cached_error) from cached_error
        if (unreachable := hub_unreachable()) is not None:
            raise _missing(what, name, unreachable) from cached_error
    try:
        return loader.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except pickle.UnpicklingError as error:
        raise _unsafe_pickle(what, name) from error
    except (OSError, ValueError) as error:
        raise _missing(what, name, error) from error


def _missing_package(what: str, name: str, error: ImportError) -> ModelLoadError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    hint = f" ({install_extra('siglip')})" if "sentencepiece" in str(error).lower() else ""
    return ModelLoadError(f"cannot load {what} {name!r}: {first}{hint}")


def _unsafe_pickle(what: str, name: str) -> ModelLoadError:
    """torch's weights-only unpickler refused a .bin file: it holds objects that would run code when loaded."""
    return ModelLoadError(f"cannot load {what} {name!r}: its pickled weights (.bin) hold more than tensors and could "
                          f"run code, so they were not loaded; use the model's safetensors weights")


def _missing(what: str, name: str, error: Exception | str) -> ModelLoadError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(name).expanduser().is_dir():
        return ModelLoadError(f"cannot load {what} from folder {name!r}: {reason}")
    return ModelLoadError(
        f"cannot load {what} {name!r}: not in the Hugging Face cache and the hub cannot be reached ({reason}). "
        f"Download it where there is internet (`hf download {name}`, then copy ~/.cache/huggingface or set "
        f"HF_HOME), or pass a local folder made with save_pretrained; offline, set HF_HUB_OFFLINE=1")


@functools.cache
def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (None when a connection opens), tried once per process: without a network,
    huggingface_hub retries a download five times with back-off, about half a minute per model, before failing."""
    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        return f"{endpoint.hostname}:{port}: {error.strerror or type(error).__name__}"
    return None


def model_revision(model: torch.nn.Module, digest: str | None) -> str:
    """The hub commit when known; for a local folder its folder_digest, so changed weights change the cache."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return str(commit)
    return digest or "unknown"


def folder_digest(name: str) -> str | None:
    """sha256 of a local model folder's weight files and config.json; None when `name` is not a folder."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + [folder / "config.json"]:
        if weights.is_file():
            with weights.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def text_embeddings(encoders: Encoders, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The pooled text (CLS of the last hidden layer by default), and the whole last layer (for --tokens)."""
    with encoders.autocast():
        if encoders.text_pooling == PROJECTED:
            return projected_text(encoders.text_model, encoders.tokenizer, input_ids, attention_mask,
                                  length=encoders.text_length)
        hidden = encoders.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return pool_text(hidden, attention_mask, encoders.text_pooling), hidden


def image_embeddings(encoders: Encoders, pixel_values: torch.Tensor):
    """The pooled image (by default DINOv2's layer-normed CLS, `pooler_output`; models without a pooler fall back to
    their first token), and the whole last layer (for --tokens)."""
    with encoders.autocast():
        if encoders.image_pooling == PROJECTED:
            return projected_image(encoders.image_model, pixel_values)
        output = encoders.image_model(pixel_values=pixel_values)
    hidden = output.last_hidden_state
    return pool_image(hidden, getattr(output, "pooler_output", None), encoders.image_pooling,
                      prefix_tokens=prefix_tokens(encoders.image_model.config)), hidden
