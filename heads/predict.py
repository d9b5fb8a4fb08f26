"""`fusion predict`: both stages on new posts — the run's encoders (as named in its cache), then its trained head.

    fusion predict --run runs/mvsa-single-self_attn --image meme.jpg --text "not bad at all"
    fusion predict --run runs/mvsa-single-self_attn --csv new_posts.csv
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fusion.errors import FusionError, ModelLoadError
from fusion.extract.batches import pad_token_ids
from fusion.extract.encoders import Encoders, image_embeddings, load_encoders, text_embeddings
from fusion.extract.images import ImageUnreadable, load_rgb
from fusion.extract.textio import read_csv
from fusion.heads.features import pooled_modality
from fusion.heads.models import predict_proba
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


def run_encoders(cache: dict, *, device: str = "auto") -> Encoders:
    """The encoders the run's cache was made with; a run whose encoders cannot be loaded is refused with why."""
    try:
        return load_encoders(cache["text_model"], cache["image_model"], device=device,
                             precision=cache.get("precision", "fp32"))
    except ModelLoadError as error:
        raise ModelLoadError(f"this run needs the encoders its cache was made with: {error}") from None


def predict_posts(head, encoders: Encoders, posts: list[Post], *, max_length: int,
                  batch_size: int = 32) -> list[Prediction]:
    """Unreadable images are reported per post; the other posts are still predicted."""
    predictions: list[Prediction] = []
    for start in range(0, len(posts), batch_size):
        predictions.extend(_predict_batch(head, encoders, posts[start:start + batch_size], max_length))
    return predictions


def _predict_batch(head, encoders: Encoders, posts: list[Post], max_length: int) -> list[Prediction]:
    pixels, readable, failures = [], [], {}
    for position, post in enumerate(posts):
        try:
            image = load_rgb(post.image)
        except ImageUnreadable as error:
            failures[position] = f"{post.image}: {error}"
            continue
        pixels.append(encoders.image_processor(images=image, return_tensors="pt")["pixel_values"][0])
        readable.append(position)
    probabilities = _probabilities(head, encoders, [posts[i].text for i in readable], pixels, max_length)
    by_position = dict(zip(readable, probabilities))
    return [_prediction(post, by_position.get(i), failures.get(i)) for i, post in enumerate(posts)]


def _probabilities(head, encoders: Encoders, texts: list[str], pixels: list, max_length: int) -> list:
    if not texts:
        return []
    token_ids = encoders.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    input_ids, attention_mask = pad_token_ids(token_ids, encoders.tokenizer.pad_token_id)
    with torch.inference_mode():
        text, _ = text_embeddings(encoders, input_ids.to(encoders.device), attention_mask.to(encoders.device))
        image, _ = image_embeddings(encoders, torch.stack(pixels).to(encoders.device, encoders.dtype))
        # The head was trained on float16 embeddings read from the cache: round the same way.
        text, image = (x.float().cpu().half().float() for x in (text, image))
        return list(predict_proba(head, pooled_modality(text), pooled_modality(image)))


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
