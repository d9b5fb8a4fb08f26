"""What `fusion serve` holds in memory: a run's encoders and head, loaded once.

A request's post is prepared on its own thread (the upload decoded with extraction's checks, the text measured
against the model's length) and predicted in a batch with others through fusion.app.predict, so the probabilities
are those `fusion predict` gives for the same image and text.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from fusion.app.predict import post_probabilities, reads_sequences, run_encoders
from fusion.extract.batches import image_pixels
from fusion.extract.encoders import Encoders
from fusion.extract.images import ImageUnreadable
from fusion.heads.checkpoint import LoadedRun, load_run
from fusion.labels import LABELS


class BadPost(Exception):
    """A post the model cannot read; str(error) names the field and says why."""


@dataclass(frozen=True)
class PreparedPost:
    text: str
    pixels: torch.Tensor
    truncated: bool  # the text has more tokens than the model reads; it is cut as extraction cuts it


class ServedModel:
    def __init__(self, run_dir: Path, loaded: LoadedRun, encoders: Encoders, precision: str):
        self.run_dir, self.loaded, self.encoders, self.precision = Path(run_dir), loaded, encoders, precision
        self.max_length = int(loaded.cache.get("max_length", 128))
        self.sequences = reads_sequences(loaded.head, loaded.tokens)
        # Fast tokenizers change their truncation settings in place on a call with other settings, which fails
        # when another thread is using them: requests measure texts with a copy of their own, one at a time.
        self._measuring = copy.deepcopy(encoders.tokenizer)
        self._measuring_lock = threading.Lock()

    @classmethod
    def load(cls, run_dir: Path, *, device: str = "auto", precision: str | None = None) -> ServedModel:
        loaded = load_run(run_dir)
        precision = precision or loaded.cache.get("precision", "fp32")
        return cls(run_dir, loaded, run_encoders(loaded.cache, device=device, precision=precision), precision)

    def prepare(self, image: BinaryIO, text: str) -> PreparedPost:
        """BadPost when the image is not one extraction would accept (empty, not an image, a bomb, ...)."""
        # The checks live in extract/images.py load_rgb, which reads a file: the upload is copied to a private
        # temporary file (its client-given name is never used) and removed at once.
        with tempfile.NamedTemporaryFile(prefix="fusion-serve-") as copied:
            shutil.copyfileobj(image, copied)
            copied.flush()
            try:
                pixels = image_pixels(Path(copied.name), self.encoders.image_processor)
            except ImageUnreadable as error:
                raise BadPost(f"image: {error}") from None
        return PreparedPost(text=text, pixels=pixels, truncated=self._too_long(text))

    def _too_long(self, text: str) -> bool:
        with self._measuring_lock:
            ids = self._measuring(text, truncation=True, max_length=self.max_length + 1)["input_ids"]
        return len(ids) > self.max_length

    def predict(self, posts: list[PreparedPost]) -> list[dict]:
        """One encoder batch; each answer has the label, the three probabilities and whether the text was cut."""
        probabilities = post_probabilities(self.loaded.head, self.encoders, [post.text for post in posts],
                                           [post.pixels for post in posts], max_length=self.max_length,
                                           sequences=self.sequences)
        return [self._answer(post, row) for post, row in zip(posts, probabilities)]

    def _answer(self, post: PreparedPost, row) -> dict:
        values = {name: float(p) for name, p in zip(LABELS, row)}
        answer = {"label": max(values, key=values.get), "probabilities": values, "truncated": post.truncated}
        if post.truncated:
            answer["note"] = (f"the text is longer than the model's {self.max_length} tokens: only its first "
                              f"{self.max_length} were read, as extraction reads them")
        return answer

    def describe(self) -> dict:
        """For /health and the page: what is served, without the server's own paths."""
        cache = self.loaded.cache
        return {"run": "/".join(self.run_dir.resolve().parts[-2:]), "head": self.loaded.config.head,
                "text_model": shown_name(cache.get("text_model")), "image_model": shown_name(cache.get("image_model")),
                "cache_fingerprint": self.loaded.meta.get("cache_fingerprint"), "dataset": cache.get("dataset"),
                "max_length": self.max_length, "tokens": self.sequences, "device": str(self.encoders.device),
                "precision": self.precision, "labels": list(LABELS)}


def shown_name(model: str | None) -> str | None:
    """A hub name as it is; a local folder (recorded as an absolute path) by its last two parts only (the last alone
    is often a bare "model")."""
    if model is None or not Path(model).is_absolute():
        return model
    return "/".join(Path(model).parts[-2:])
