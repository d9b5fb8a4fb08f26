"""A trained run that labels new posts: its encoders (as named in its cache), then its head. `fusion predict`, `fusion
serve` and the API's `load_run(...).predict(...)` all go through one Predictor, so they give the same numbers.

    predictor = fusion.load_run("runs/mvsa-single-self_attn")
    predictor.predict(["meme.jpg"], ["not bad at all"])  # [{"label": ..., "probabilities": {...}, ...}]
    predictor.predict(["meme.jpg"], ["not bad at all"], explain=True)  # ... and "explanation": {...}

The head sees what training saw: texts cut as extraction cuts them, embeddings rounded to float16 as the cache
stores them, and for a dual_attn head fitted with --tokens the whole token and patch sequences (the other heads read
token 0 only, the pooled embedding, whatever they were fitted on). The Predictor alone decides where the encoders
and the head live (one device, both) and in which precision.

Probabilities are calibrated by default: the head's logits divided by the run's temperature, fitted on validation
(heads/posthoc/calibration.py), which never changes the label; `raw=True` gives the head's own softmax, and a run
written before temperatures were fitted says "uncalibrated". `explain=True` adds what the head says from each
modality alone and, for dual_attn on token sequences, the attention it gave each word piece and image patch
(heads/posthoc/explain.py): docs/explain.md.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fusion.device import resolve_device, run_encoder_precision
from fusion.errors import FusionError, ModelLoadError
from fusion.extract.batches import as_pipeline
from fusion.extract.embedding import embed_posts
from fusion.extract.encoders import Encoders, load_encoders
from fusion.extract.images import ImageUnreadable, load_rgb
from fusion.extract.pixels import visible_box
from fusion.extract.pooling import pooling_choice, prefix_tokens
from fusion.heads.checkpoint import LoadedRun, load_run
from fusion.heads.features import Modality, pooled_modality, token_features
from fusion.heads.posthoc.calibration import calibrated
from fusion.heads.posthoc.explain import explained_logits
from fusion.labels import LABELS

DEFAULT_BATCH = 32


class BadPost(FusionError):
    """A post the model cannot read; str(error) names the field and says why."""


@dataclass(frozen=True)
class PreparedPost:
    """A post decoded and tokenized, ready for an encoder batch."""
    token_ids: list[int]  # cut to the model's length, as extraction cuts them
    pixels: torch.Tensor
    truncated: bool  # the text has more tokens than the model reads
    image_size: tuple[int, int] = (0, 0)  # the decoded image's (width, height): where the patch grid lies on it
    explain: bool = False  # answer with an "explanation" too
    raw: bool = False  # the head's own probabilities, not the calibrated ones


class Predictor:
    def __init__(self, run_dir: Path, loaded: LoadedRun, encoders: Encoders, precision: str,
                 notes: tuple[str, ...] = ()):
        self.run_dir, self.loaded, self.encoders, self.precision = Path(run_dir), loaded, encoders, precision
        self.notes = notes
        self.head = loaded.head.to(encoders.device)  # the head runs beside the encoders, in fp32
        self.max_length = int(loaded.cache.get("max_length", 128))
        # A dual_attn head fitted on token sequences is given them; every other head reads the pooled embeddings.
        self.sequences = loaded.tokens and loaded.config.head == "dual_attn"
        # Fast tokenizers change their truncation settings in place on a call, which fails while another thread is
        # inside them: each thread that prepares posts tokenizes with a copy of its own.
        self._local = threading.local()

    @classmethod
    def load(cls, run: Path | str, *, device: str = "auto", precision: str | None = None) -> Predictor:
        """The run's head and the encoders its cache was made with, on `device`, in `precision` (default: the
        cache's; an fp16 cache runs in fp32 on a CPU, with a note)."""
        loaded = load_run(run)
        target = resolve_device(device)
        precision, note = run_encoder_precision(precision or loaded.cache.get("precision", "fp32"), target)
        cache = loaded.cache
        try:
            encoders = load_encoders(cache["text_model"], cache["image_model"], device=str(target),
                                     precision=precision,
                                     text_pooling=pooling_choice("text", cache.get("text_pooling")),
                                     image_pooling=pooling_choice("image", cache.get("image_pooling")))
        except ModelLoadError as error:
            raise ModelLoadError(f"this run needs the encoders its cache was made with: {error}") from None
        return cls(Path(run), loaded, encoders, precision, notes=(note,) if note else ())

    def predict(self, images: Sequence[Any], texts: Sequence[str], *, explain: bool = False, raw: bool = False,
                batch_size: int = DEFAULT_BATCH) -> list[dict]:
        """One answer per post, in order: {"label", "probabilities", "calibration"} (and "truncated" when the text
        was cut; "explanation" with explain=True), or {"error"} for a post whose image cannot be read. Images are
        paths, bytes or PIL images. raw: the head's own probabilities instead of the calibrated ones."""
        if len(images) != len(texts):
            raise FusionError(f"{len(images)} image(s) but {len(texts)} text(s): give one text per image")
        answers: list[dict] = []
        for start in range(0, len(images), batch_size):
            prepared: list[PreparedPost | dict] = []
            for image, text in zip(images[start:start + batch_size], texts[start:start + batch_size]):
                try:
                    prepared.append(self.prepare(image, text, explain=explain, raw=raw))
                except BadPost as error:
                    prepared.append({"error": f"{_where(image)}{error}"})
            readable = iter(self.predict_prepared([post for post in prepared if isinstance(post, PreparedPost)]))
            answers.extend(post if isinstance(post, dict) else next(readable) for post in prepared)
        return answers

    def prepare(self, image: Any, text: str, *, explain: bool = False, raw: bool = False,
                max_pixels: int | None = None) -> PreparedPost:
        """Decode and tokenize one post (safe on any thread); BadPost when the image is not one extraction would
        accept (missing, empty, not an image, a refused format, over `max_pixels`, ...). `image`: a path, bytes, a
        binary file object (an upload, decoded from its spooled file without another copy) or a PIL image.
        explain, raw: how this post is to be answered (see predict)."""
        if isinstance(image, str):
            image = Path(image)
        try:
            picture = load_rgb(image, max_pixels=max_pixels)
        except ImageUnreadable as error:
            raise BadPost(f"image: {error}") from None
        pixels = as_pipeline(self.encoders.pixels).crop(picture)
        # Every chunk past the first is text the model does not read: one tokenization tells both.
        chunks = self._tokenizer()(str(text), truncation=True, max_length=self.max_length,
                                   return_overflowing_tokens=True)["input_ids"]
        return PreparedPost(token_ids=list(chunks[0]), pixels=pixels, truncated=len(chunks) > 1,
                            image_size=picture.size, explain=explain, raw=raw)

    def predict_prepared(self, posts: list[PreparedPost]) -> list[dict]:
        """One encoder batch, then the head (and for a batch with a post to explain, two more head passes); one
        answer per post."""
        if not posts:
            return []
        text, image = self._features([post.token_ids for post in posts], torch.stack([p.pixels for p in posts]))
        explain = any(post.explain for post in posts)
        with torch.inference_mode():
            if explain and self.loaded.train_means is not None:
                logits = explained_logits(self.head, text, image, self.loaded.train_means)
            else:
                attention: dict[str, torch.Tensor] | None = {} if explain else None
                logits = {"fused": self.head(text, image, attention), "attention": attention or {}}
        on_host = {name: value.float().cpu() for name, value in logits.items() if name != "attention"}
        on_host["attention"] = {name: weights.float().cpu() for name, weights in logits["attention"].items()}
        return [self._answer(post, index, on_host) for index, post in enumerate(posts)]

    def _features(self, token_ids: list[list[int]], pixels: torch.Tensor) -> tuple[Modality, Modality]:
        arrays = embed_posts(self.encoders, token_ids, pixels, with_tokens=self.sequences)
        if not self.sequences:
            text, image = pooled_modality(arrays["text"]), pooled_modality(arrays["image"])
        else:
            # The sequences as fit --tokens reads them from the cache: token 0 replaced by the pooled embedding.
            features = token_features(arrays["text_tokens"], arrays["text_mask"], arrays["image_tokens"],
                                      arrays["text"], arrays["image"], np.zeros(len(token_ids)))
            text, image = features.text, features.image
        return self._on_device(text), self._on_device(image)

    def _on_device(self, modality: Modality) -> Modality:
        return Modality(modality.tokens.to(self.encoders.device), modality.mask.to(self.encoders.device))

    def _answer(self, post: PreparedPost, index: int, logits: dict) -> dict:
        values = self._probabilities(logits["fused"][index], post.raw)
        answer: dict = {"label": max(values, key=values.get), "probabilities": values,
                        "calibration": self._calibration(post.raw)}
        if post.explain:
            answer["explanation"] = self._explanation(post, index, logits)
        if post.truncated:
            answer["truncated"] = True
            answer["note"] = (f"the text is longer than the model's {self.max_length} tokens: only its first "
                              f"{self.max_length} were read, as extraction reads them")
        return answer

    def _probabilities(self, logits: torch.Tensor, raw: bool) -> dict[str, float]:
        return {name: float(p) for name, p in zip(LABELS, calibrated(logits, None if raw else self.temperature))}

    def _calibration(self, raw: bool) -> str:
        """What the probabilities are: "calibrated" (divided by the run's temperature), "raw" (asked for), or
        "uncalibrated" (the run has no temperature)."""
        return "raw" if raw else "uncalibrated" if self.temperature is None else "calibrated"

    @property
    def temperature(self) -> float | None:
        return self.loaded.temperature

    def _explanation(self, post: PreparedPost, index: int, logits: dict) -> dict:
        """text_only and image_only probabilities (as the answer's own: calibrated unless raw) and, for dual_attn on
        token sequences, where the attention went."""
        if "text_only" in logits:
            explanation = {name: self._probabilities(logits[name][index], post.raw)
                           for name in ("text_only", "image_only")}
        else:
            explanation = {"note": "this run was written before runs stored the training split's mean embeddings, "
                                   "which stand in for a modality: fit it again to see what each modality says"}
        attention = logits["attention"]
        if "text" in attention:
            tokens = self._tokenizer().convert_ids_to_tokens(post.token_ids)
            weights = attention["text"][index, :len(tokens)].tolist()  # padding follows, with weight 0
            explanation["text_attention"] = [{"token": token, "weight": weight}
                                             for token, weight in zip(tokens, weights)]
        if "image" in attention:
            explanation.update(self._patch_grid(attention["image"][index], post))
        return explanation

    def _patch_grid(self, weights: torch.Tensor, post: PreparedPost) -> dict:
        """The image tokens' weights: the class token's, the registers' (if any), and the patches' renormalised to
        sum to 1, as the encoder's rows x columns grid; with the part of the image that grid covers."""
        config = self.encoders.image_model.config
        prefix = prefix_tokens(config)
        patches = weights[prefix:].double()
        patch = getattr(config, "patch_size", 0)
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch or 0)
        rows, columns = (post.pixels.shape[-2] // patch, post.pixels.shape[-1] // patch) if patch else (0, 0)
        if rows * columns != len(patches):  # an encoder whose tokens are not a patch grid of its input
            rows = columns = math.isqrt(len(patches))
            if rows * columns != len(patches):
                rows, columns = 1, len(patches)
        grid = (patches / patches.sum()).reshape(rows, columns) if len(patches) and patches.sum() > 0 \
            else torch.zeros(rows, columns, dtype=torch.float64)
        shown = {"image_attention": grid.tolist(), "image_attention_cls": float(weights[0])}
        if prefix > 1:
            shown["image_attention_registers"] = weights[1:prefix].tolist()
        processor = as_pipeline(self.encoders.pixels).processor
        shown["image_view"] = visible_box(processor, *post.image_size) if all(post.image_size) else None
        return shown

    def _tokenizer(self):
        if not hasattr(self._local, "tokenizer"):
            self._local.tokenizer = copy.deepcopy(self.encoders.tokenizer)
        return self._local.tokenizer

    def describe(self) -> dict:
        """What is served, without the server's own paths."""
        cache = self.loaded.cache
        return {"run": "/".join(self.run_dir.resolve().parts[-2:]), "head": self.loaded.config.head,
                "text_model": shown_name(cache.get("text_model")), "image_model": shown_name(cache.get("image_model")),
                "cache_fingerprint": self.loaded.meta.get("cache_fingerprint"), "dataset": cache.get("dataset"),
                "max_length": self.max_length, "tokens": self.sequences, "device": str(self.encoders.device),
                "precision": self.precision, "labels": list(LABELS), "temperature": self.temperature,
                "calibration": self._calibration(raw=False), "explains": self.loaded.train_means is not None}


def _where(image: Any) -> str:
    """How an error names the image: its path, or nothing for bytes and images held in memory."""
    return f"{image}: " if isinstance(image, (str, Path)) else ""


def shown_name(model: str | None) -> str | None:
    """A hub name as it is; a local folder (recorded as an absolute path) by its last two parts only (the last alone
    is often a bare "model")."""
    if model is None or not Path(model).is_absolute():
        return model
    return "/".join(Path(model).parts[-2:])

