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

import torch

from fusion.errors import FusionError, ModelLoadError
from fusion.extract.batches import pad_token_ids
from fusion.extract.encoders import Encoders, image_embeddings, load_encoders, text_embeddings
from fusion.extract.images import ImageUnreadable, load_rgb
from fusion.extract.textio import read_csv
from fusion.heads.features import Modality, pooled_modality, token_modality
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


def run_encoders(cache: dict, *, device: str = "auto") -> Encoders:
    """The encoders the run's cache was made with; a run whose encoders cannot be loaded is refused with why."""
    try:
        return load_encoders(cache["text_model"], cache["image_model"], device=device,
                             precision=cache.get("precision", "fp32"))
    except ModelLoadError as error:
        raise ModelLoadError(f"this run needs the encoders its cache was made with: {error}") from None


def predict_posts(head: Head, encoders: Encoders, posts: list[Post], *, max_length: int, batch_size: int = 32,
                  tokens: bool = False) -> list[Prediction]:
    """Unreadable images are reported per post; the other posts are still predicted.

    tokens: the head was fitted on token sequences (LoadedRun.tokens); a dual_attn head is then given them too.
    """
    sequences = tokens and head.spec.fusion == "dual_attn"
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
            image = load_rgb(post.image)
        except ImageUnreadable as error:
            failures[position] = f"{post.image}: {error}"
            continue
        pixels.append(encoders.image_processor(images=image, return_tensors="pt")["pixel_values"][0])
        readable.append(position)
    texts = [posts[i].text for i in readable]
    probabilities = _probabilities(head, encoders, texts, pixels, max_length=max_length, sequences=sequences)
    by_position = dict(zip(readable, probabilities))
    return [_prediction(post, by_position.get(i), failures.get(i)) for i, post in enumerate(posts)]


def _probabilities(head: Head, encoders: Encoders, texts: list[str], pixels: list, *, max_length: int,
                   sequences: bool) -> list:
    if not texts:
        return []
    token_ids = encoders.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    # Padded as extraction pads them (to a multiple of 8 under CPU bf16), so the encoders meet the same shapes.
    input_ids, attention_mask = pad_token_ids(token_ids, encoders.tokenizer.pad_token_id, encoders.pad_multiple)
    with torch.inference_mode():
        text, text_tokens = text_embeddings(encoders, input_ids.to(encoders.device),
                                            attention_mask.to(encoders.device))
        image, image_tokens = image_embeddings(encoders, torch.stack(pixels).to(encoders.device, encoders.dtype))
        if not sequences:
            return list(predict_proba(head, pooled_modality(_as_cached(text)), pooled_modality(_as_cached(image))))
        text_modality, image_modality = _token_modalities(text, text_tokens, attention_mask, image, image_tokens)
        return list(predict_proba(head, text_modality, image_modality))


def _token_modalities(text, text_tokens, attention_mask, image, image_tokens) -> tuple[Modality, Modality]:
    """The sequences as fit --tokens read them from the cache (features_from_cache): text cut to the batch's longest
    text (padding kept as the encoder left it, as extraction stores it; the mask hides it), token 0 = pooled."""
    longest = int(attention_mask.sum(1).max())
    text_modality = token_modality(_as_cached(text_tokens[:, :longest]), attention_mask[:, :longest].bool(),
                                    _as_cached(text))
    image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool)
    return text_modality, token_modality(_as_cached(image_tokens), image_mask, _as_cached(image))


def _as_cached(values: torch.Tensor) -> torch.Tensor:
    """Rounded to float16 as the cache stores embeddings (the head was trained on those), back as float32 on the CPU."""
    return values.to(torch.float16).cpu().float()


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
