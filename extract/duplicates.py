"""Posts that occur in more than one split. Extraction counts them, the cache records the counts, and `--dedupe`
drops them.

MVSA was scraped from Twitter. A retweet ("RT @user: ...") repeats a tweet's text, a repost repeats its picture, and a
seeded 8:1:1 split can put the copies in different splits, so the heads may already have seen a test post in
training. Two posts are duplicates when either of these holds:
- Their normalised texts are equal and not empty. Normalising applies Unicode NFKC and casefolding, then drops URLs
  (http://, https://, www.) and @mentions, together with the "RT" that opens a retweet and the colon after the
  mention, then collapses whitespace. A text that this leaves empty (a bare link, or a caption that is missing) matches
  nothing.
- Their images have the same pixels: sha256 of the decoded RGB pixels and the image's size, not of the file's bytes.
  The same picture stored again as another file (other metadata, PNG instead of BMP) counts. A JPEG that another
  upload re-encoded, or a resized copy, has other pixels and does not count.

`find_duplicates` counts, for each pair of splits (train-val, train-test, val-test), the posts of the later split
whose text, image, or either also occurs in the earlier split. `drop_duplicates` is `fusion extract --dedupe`. It is
off by default, because the paper's protocol keeps every post. It drops the validation and test posts that duplicate
a training post, and each one is listed under /skipped with its reason, like every row left out.

Cost: the image hashes need every image decoded once more before the encoders run (`image_digests`, in as many
DataLoader workers as the extraction decodes with), and sha256 of the pixels adds about half a decode again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from torch.utils.data import DataLoader, Dataset

from fusion.extract.datasets.samples import DatasetSamples, Sample
from fusion.extract.images import ImageUnreadable, load_rgb

PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))
TEXT_RULE = "NFKC, casefold, URLs and @mentions (with a retweet's 'RT' and colon) dropped, whitespace collapsed"
IMAGE_RULE = "sha256 of the decoded RGB pixels and size (not the file bytes)"
EXAMPLES = 5  # (later id, earlier id, what) per split pair kept in the record, for a reader to check by eye

_URL = re.compile(r"(?:https?://|www\.)\S+")
_RETWEET = re.compile(r"(?<!\w)rt\s+(?=@\w)")
_MENTION = re.compile(r"@\w+:?")


def normalise_text(text: str) -> str:
    """The text as duplicates are compared: see the module docstring."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _MENTION.sub(" ", _RETWEET.sub(" ", _URL.sub(" ", text)))
    return " ".join(text.split())


def image_digest(image) -> str | None:
    """sha256 of an image's decoded RGB pixels, its size included; None when it cannot be decoded (extraction skips
    it anyway). `image` is a path, bytes, or a stored image (extract/datasets/hfdata.py StoredImage)."""
    try:
        rgb = load_rgb(image.read_image() if hasattr(image, "read_image") else image)
    except ImageUnreadable:
        return None
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


class _Digests(Dataset):
    def __init__(self, images: Sequence):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> str | None:
        return image_digest(self.images[index])


def _as_list(items: list) -> list:
    return items


def image_digests(images: Sequence, *, workers: int) -> list[str | None]:
    """image_digest of every image, decoded in `workers` DataLoader workers (0: in this process)."""
    loader = DataLoader(_Digests(images), batch_size=16, num_workers=workers, collate_fn=_as_list)
    return [digest for batch in loader for digest in batch]


@dataclass(frozen=True)
class Duplicates:
    counts: dict[str, dict[str, int]]  # "train-test" -> {"text": n, "image": n, "either": n}
    examples: dict[str, list[list[str]]]  # "train-test" -> [[test id, train id, "text" | "image" | "text and image"]]
    of_training: dict[int, str]  # index of a val/test sample -> what it shares with a training post

    def record(self, *, dedupe: bool) -> dict:
        """What the cache stores (attribute `duplicates`): the counts, the rules, and what --dedupe dropped."""
        dropped = {"val": 0, "test": 0}
        if dedupe:
            for pair in ("train-val", "train-test"):
                dropped[pair.split("-")[1]] = self.counts[pair]["either"]
        return {"pairs": self.counts, "examples": self.examples, "dedupe": dedupe, "dropped": dropped,
                "text": TEXT_RULE, "image": IMAGE_RULE}


def find_duplicates(samples: list[Sample], digests: Sequence[str | None]) -> Duplicates:
    """Posts of a later split whose normalised text or image digest also occurs in an earlier split."""
    texts = [normalise_text(sample.text) for sample in samples]
    counts, examples, of_training = {}, {}, {}
    for earlier, later in PAIRS:
        seen_text = _first_ids(samples, texts, earlier)
        seen_image = _first_ids(samples, digests, earlier)
        name, either, shown = f"{earlier}-{later}", 0, []
        text_count = image_count = 0
        for index, sample in enumerate(samples):
            if sample.split != later:
                continue
            shared = [what for what, key, seen in (("text", texts[index], seen_text),
                                                   ("image", digests[index], seen_image)) if key and key in seen]
            if not shared:
                continue
            text_count += "text" in shared
            image_count += "image" in shared
            either += 1
            what = " and ".join(shared)
            if earlier == "train":
                of_training[index] = what
            if len(shown) < EXAMPLES:
                key = texts[index] if "text" in shared else digests[index]
                shown.append([sample.id, (seen_text if "text" in shared else seen_image)[key], what])
        counts[name] = {"text": text_count, "image": image_count, "either": either}
        examples[name] = shown
    return Duplicates(counts, examples, of_training)


def _first_ids(samples: list[Sample], keys: Sequence[str | None], split: str) -> dict[str, str]:
    """key -> the id of the first post of `split` that has it (empty keys match nothing)."""
    first: dict[str, str] = {}
    for sample, key in zip(samples, keys):
        if sample.split == split and key:
            first.setdefault(key, sample.id)
    return first


def drop_duplicates(data: DatasetSamples, duplicates: Duplicates) -> DatasetSamples:
    """`--dedupe`: the validation and test posts that duplicate a training post move to `skipped`, with the reason."""
    kept = [sample for index, sample in enumerate(data.samples) if index not in duplicates.of_training]
    dropped = [(sample.id, sample.split, f"duplicates a training post ({duplicates.of_training[index]})")
               for index, sample in enumerate(data.samples) if index in duplicates.of_training]
    return dataclasses.replace(data, samples=kept, skipped=[*data.skipped, *dropped])
