"""`fusion predict`: both stages on new posts — the run's encoders (as named in its cache), then its trained head.

    fusion predict --run runs/mvsa-single-self_attn --image meme.jpg --text "not bad at all"
    fusion predict --run runs/mvsa-single-self_attn --csv new_posts.csv

The head sees what training saw: texts padded and cut as extraction does, embeddings rounded to float16 as the cache
stores them, and for a dual_attn head fitted with --tokens the whole token and patch sequences (the other heads read
token 0 only, the pooled embedding, whatever they were fitted on).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fusion.errors import FusionError, ModelLoadError
from fusion.extract.batches import image_pixels
from fusion.extract.embedding import embed_posts
from fusion.extract.encoders import Encoders, load_encoders, resolve_device
from fusion.extract.images import ImageUnreadable
from fusion.extract.pooling import pooling_choice
from fusion.extract.textio import read_csv
from fusion.heads.features import Modality, pooled_modality, token_features
from fusion.heads.models import Head, predict_proba
from fusion.labels import LABELS


@dataclass(frozen=True)
class Post:
    image: Path
    text: str
    row: int | None = None  # line in the CSV, for messages


@dataclass(frozen=True)
class Prediction:
    post: Post
    label: str | None
    probabilities: dict[str, float] | None
    error: str | None = None


def posts_from_csv(path: Path) -> list[Post]:
    """Columns `image` and `text`; relative image paths are resolved against the CSV's folder."""
    table = read_csv(Path(path), required=("image", "text"))
    folder = Path(path).parent
    return [Post(image=folder / row["image"].strip(), text=row["text"].strip(), row=line) for line, row in table.rows]


def run_encoders(cache: dict, *, device: str = "auto", precision: str | None = None) -> Encoders:
    """The encoders the run's cache was made with (in its precision unless `precision` is given); a run whose
    encoders cannot be loaded is refused with why."""
    try:
        return load_encoders(cache["text_model"], cache["image_model"], device=device,
                             precision=precision or encoder_precision(cache, device)[0],
                             text_pooling=pooling_choice("text", cache.get("text_pooling")),
                             image_pooling=pooling_choice("image", cache.get("image_pooling")))
    except ModelLoadError as error:
        raise ModelLoadError(f"this run needs the encoders its cache was made with: {error}") from None


def encoder_precision(cache: dict, device: str) -> tuple[str, str | None]:
    """The precision the run's encoders run in here, and a note when it is not the one its cache was extracted in:
    fp16 needs a GPU (encoders.weight_dtypes refuses it on CPU), so on a CPU an fp16 run's encoders run in fp32."""
    precision = cache.get("precision", "fp32")
    if precision == "fp16" and resolve_device(device).type == "cpu":
        return "fp32", ("this run's cache was extracted in fp16 on a GPU; on this CPU its encoders run in fp32, so "
                        "the embeddings differ from the cache's by about fp16's rounding")
    return precision, None


def predict_posts(head: Head, encoders: Encoders, posts: list[Post], *, max_length: int, batch_size: int = 32,
                  tokens: bool = False) -> list[Prediction]:
    """Unreadable images are reported per post; the other posts are still predicted.

    tokens: the head was fitted on token sequences (LoadedRun.tokens); a dual_attn head is then given them too.
    The head runs on the encoders' device (moved there), in fp32 whatever precision it was fitted in.
    """
    head = head.to(encoders.device)
    sequences = reads_sequences(head, tokens)
    predictions: list[Prediction] = []
    for start in range(0, len(posts), batch_size):
        batch = posts[start:start + batch_size]
        predictions.extend(_predict_batch(head, encoders, batch, max_length=max_length, sequences=sequences))
    return predictions


def _predict_batch(head: Head, encoders: Encoders, posts: list[Post], *, max_length: int,
                   sequences: bool) -> list[Prediction]:
    pixels, readable, failures = [], [], {}
    for position, post in enumerate(posts):
        try:
            pixels.append(image_pixels(post.image, encoders.pixels))
        except ImageUnreadable as error:
            failures[position] = f"{post.image}: {error}"
            continue
        readable.append(position)
    texts = [posts[i].text for i in readable]
    probabilities = post_probabilities(head, encoders, texts, pixels, max_length=max_length, sequences=sequences)
    by_position = dict(zip(readable, probabilities))
    return [_prediction(post, by_position.get(i), failures.get(i)) for i, post in enumerate(posts)]


def reads_sequences(head: Head, tokens: bool) -> bool:
    """A dual_attn head fitted on token sequences is given them; every other head reads the pooled embeddings."""
    return tokens and head.spec.fusion == "dual_attn"


def post_probabilities(head: Head, encoders: Encoders, texts: list[str], pixels: list, *, max_length: int,
                       sequences: bool) -> list:
    """One encoder batch: texts (cut to max_length tokens) and preprocessed pixels -> the head's probabilities."""
    if not texts:
        return []
    token_ids = encoders.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    arrays = embed_posts(encoders, token_ids, torch.stack(pixels), with_tokens=sequences)
    if not sequences:
        text, image = pooled_modality(arrays["text"]), pooled_modality(arrays["image"])
    else:
        # The sequences as fit --tokens reads them from the cache: token 0 replaced by the pooled embedding.
        features = token_features(arrays["text_tokens"], arrays["text_mask"], arrays["image_tokens"], arrays["text"],
                                  arrays["image"], np.zeros(len(texts)))
        text, image = features.text, features.image
    return list(predict_proba(head, _on(text, encoders.device), _on(image, encoders.device)).cpu())


def _on(modality: Modality, device: torch.device) -> Modality:
    return Modality(modality.tokens.to(device), modality.mask.to(device))


def _prediction(post: Post, probabilities, error: str | None) -> Prediction:
    if probabilities is None:
        return Prediction(post=post, label=None, probabilities=None, error=error or "no prediction")
    values = {name: float(p) for name, p in zip(LABELS, probabilities)}
    return Prediction(post=post, label=max(values, key=values.get), probabilities=values)


def require_inputs(image: Path | None, text: str | None, csv_path: Path | None) -> None:
    if csv_path is None and (image is None or text is None):
        raise FusionError("give --image and --text for one post, or --csv FILE with columns image,text")
    if csv_path is not None and (image is not None or text is not None):
        raise FusionError("give either --csv or --image/--text, not both")
