"""A synthetic dataset in the exact MVSA-Single on-disk format, for `fusion demo` and end-to-end tests.

The real datasets cannot be downloaded here, so the demo writes pairs whose sentiment is learnable but not trivial:
- text carries the text label through sentiment words, negations ("not good" is negative), contrast clauses
  ("X was bad but Y was great": the last clause wins) and neutral chatter that sometimes holds a stray polar word;
- the image carries the image label through colour warmth/brightness (noisy), and in most images a smiling/frowning
  face or an up/down arrow, among random distractor shapes and pixel noise;
- the two labels combine by the MVSA rule, so a pair labelled positive because of its image needs the image;
- a few per-modality labels in the label file are flipped (annotation noise), and a few texts are cp1252, as in
  the real files.

    from fusion.extract.datasets.demo_data import write_demo_dataset
    root = write_demo_dataset(Path("demo"), n=1500, seed=0)   # -> demo/MVSA_Single
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fusion.atomic import write_bytes_atomic
from fusion.extract.datasets.mvsa import load_mvsa
from fusion.extract.datasets.samples import DatasetSamples

FOLDER = "MVSA_Single"
MANIFEST_NAME = "demo_manifest.json"
IMAGE_SIZE = 96
# Combined-class shares after cleaning, as in MVSA-Single (positive 2683, neutral 470, negative 1358 of 4511).
CLASS_SHARES = {"positive": 0.595, "neutral": 0.104, "negative": 0.301}
# Raw MVSA-Single loses about 7% of its pairs to pos+neg conflicts; with label noise this gives a similar share.
CONFLICT_SHARE = 0.05
LABEL_NOISE = 0.04   # per modality: share of label-file entries flipped away from what the content shows
CP1252_SHARE = 0.01  # texts written in cp1252, like the real files' non-UTF-8 tweets
# (text, image) for each combined class: half the polar pairs say it in both modalities, half in only one.
MODALITY_PAIRS = {
    "positive": ((("positive", "positive"), 0.5), (("positive", "neutral"), 0.25), (("neutral", "positive"), 0.25)),
    "negative": ((("negative", "negative"), 0.5), (("negative", "neutral"), 0.25), (("neutral", "negative"), 0.25)),
    "neutral": ((("neutral", "neutral"), 1.0),),
}

SUBJECTS = ("the game", "this weather", "my new phone", "the concert", "today", "the service here", "this coffee",
            "the new album", "our trip", "the traffic", "the match", "my morning", "this city", "the movie",
            "the food", "the show", "work", "the update", "the hotel", "class")
POS_ADJ = ("great", "amazing", "wonderful", "beautiful", "lovely", "fantastic", "awesome", "brilliant", "good")
NEG_ADJ = ("awful", "terrible", "horrible", "ugly", "boring", "annoying", "bad", "disappointing", "sad")
PLACES = ("the station", "downtown", "the office", "the airport", "campus", "the mall", "the gym", "the library")
TIMES = ("5pm", "noon", "9:30", "tomorrow", "monday", "tonight", "8am")
TAGS = ("#tbt", "#news", "#weekend", "#travel", "#music", "#photo", "#monday", "#sports")
TEMPLATES = {
    "positive": ("{S} is {P}", "{S} was so {P}! {T}", "I love {s}", "really enjoying {s} {T}",
                 "{S} is not {N} at all", "{S} was never {N}, honestly", "{S} was {N} but {s2} was {P}",
                 "so {P} :)", "can't stop smiling, {s} was {P}"),
    "negative": ("{S} is {N}", "{S} was so {N}. {T}", "I hate {s}", "not happy with {s}",
                 "{S} is not {P}", "{S} was not good at all", "{S} was {P} but {s2} was {N}",
                 "ugh, {s} again :(", "{S} isn't {P} anymore"),
    "neutral": ("heading to {L} for {s}", "{S} starts at {H}", "anyone know when {s} opens?", "photo from {L} {T}",
                "meeting at {H}, then {L}", "RT @{U}: {s} update {url}", "good morning, off to {L}",
                "{S} at {H} {T}", "watching {s} from {L}", "is {s} on at {H}?"),
}
USERS = ("anna_k", "newsdesk", "tom84", "cityinfo", "mjr", "dailypics")


@dataclass(frozen=True)
class DemoPair:
    """One generated pair: what the content shows, and what the label file says (differs for noisy entries)."""

    id: str
    text_label: str        # the label the text was written to carry
    image_label: str       # the label the image was drawn to carry
    file_text_label: str   # what labelResultAll.txt says (after annotation noise)
    file_image_label: str
    combined: str | None   # the MVSA rule applied to the file labels; None = pos+neg, dropped by the loader
    text: str
    encoding: str          # how the .txt file is encoded


def combine(text_label: str, image_label: str) -> str | None:
    """The MVSA cleaning rule: polar wins over neutral; pos+neg is a conflict (None)."""
    labels = {text_label, image_label}
    if labels == {"positive", "negative"}:
        return None
    polar = labels - {"neutral"}
    return polar.pop() if polar else "neutral"


def plan_pairs(n: int, seed: int = 0) -> list[DemoPair]:
    """All pairs' labels and texts, deterministic for (n, seed); images are drawn from the same per-pair seeds."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    # Real IDs are not contiguous: gaps of 1-4 between consecutive IDs.
    ids = np.cumsum(rng.integers(1, 5, size=n))
    pairs = []
    for index, pair_id in enumerate(ids):
        pair_rng = np.random.default_rng((seed, index, 1))
        text_label, image_label = _sample_modality_labels(pair_rng)
        file_text = _maybe_flip(text_label, pair_rng)
        file_image = _maybe_flip(image_label, pair_rng)
        encoding = "cp1252" if pair_rng.random() < CP1252_SHARE else "utf-8"
        text = _make_text(text_label, pair_rng, accented=encoding == "cp1252")
        pairs.append(DemoPair(str(pair_id), text_label, image_label, file_text, file_image,
                              combine(file_text, file_image), text, encoding))
    return pairs


def _sample_modality_labels(rng: np.random.Generator) -> tuple[str, str]:
    if rng.random() < CONFLICT_SHARE:
        return ("positive", "negative") if rng.random() < 0.5 else ("negative", "positive")
    names = list(CLASS_SHARES)
    combined = names[rng.choice(len(names), p=list(CLASS_SHARES.values()))]
    options = MODALITY_PAIRS[combined]
    chosen = rng.choice(len(options), p=[weight for _, weight in options])
    return options[chosen][0]


def _maybe_flip(label: str, rng: np.random.Generator) -> str:
    if rng.random() >= LABEL_NOISE:
        return label
    others = [name for name in CLASS_SHARES if name != label]
    return others[rng.integers(len(others))]


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[rng.integers(len(options))]


def _make_text(label: str, rng: np.random.Generator, *, accented: bool = False) -> str:
    subject, other = rng.choice(len(SUBJECTS), size=2, replace=False)
    text = _pick(TEMPLATES[label], rng).format(
        S=SUBJECTS[subject].capitalize(), s=SUBJECTS[subject], s2=SUBJECTS[other], P=_pick(POS_ADJ, rng),
        N=_pick(NEG_ADJ, rng), L=_pick(PLACES, rng), H=_pick(TIMES, rng), T=_pick(TAGS, rng), U=_pick(USERS, rng),
        url=f"http://t.co/{rng.integers(16**6):06x}")
    # Tweets carry mentions and hashtags unrelated to their sentiment.
    if rng.random() < 0.3:
        text = f"@{_pick(USERS, rng)} {text}"
    if rng.random() < 0.2:
        text = f"{text} {_pick(TAGS, rng)}"
    if accented:
        text = f"{text} at the café"
    return text


def draw_image(label: str, rng: np.random.Generator) -> Image.Image:
    """A 96x96 RGB image whose warmth and symbol lean towards `label`, with distractors and noise."""
    valence = {"negative": -1.0, "neutral": 0.0, "positive": 1.0}[label]
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _background(valence, rng))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 4)):
        _draw_distractor(draw, rng)
    symbol = rng.random()
    if symbol < 0.35:
        _draw_face(draw, valence, rng)
    elif symbol < 0.65:
        _draw_arrow(draw, valence, rng)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 10.0, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _background(valence: float, rng: np.random.Generator) -> tuple[int, int, int]:
    # Warm and bright for positive, cool and dark for negative, greyish in between; the noise makes classes overlap.
    cue = np.clip(0.8 * valence + rng.normal(0.0, 0.55), -1.5, 1.5)
    cool, grey, warm = np.array([50, 70, 140]), np.array([135, 135, 125]), np.array([235, 170, 70])
    base = grey + cue * (warm - grey) if cue >= 0 else grey - cue * (cool - grey)
    colour = np.clip(base + rng.normal(0.0, 18.0, 3), 0, 255)
    return tuple(int(c) for c in colour)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _draw_distractor(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - 8, 2))
    w, h = (int(v) for v in rng.integers(6, 24, 2))
    box = (x, y, min(x + w, IMAGE_SIZE - 1), min(y + h, IMAGE_SIZE - 1))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=_random_colour(rng))


def _draw_face(draw: ImageDraw.ImageDraw, valence: float, rng: np.random.Generator) -> None:
    r = int(rng.integers(18, 30))
    cx, cy = (int(v) for v in rng.integers(r + 2, IMAGE_SIZE - r - 2, 2))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, 225, 90), outline=(30, 30, 30), width=2)
    eye = max(2, r // 7)
    for ex in (cx - r // 3, cx + r // 3):
        draw.ellipse((ex - eye, cy - r // 3 - eye, ex + eye, cy - r // 3 + eye), fill=(20, 20, 20))
    mouth = (cx - r // 2, cy, cx + r // 2, cy + r // 2)
    if valence > 0:    # smile: the lower half of an ellipse
        draw.arc(mouth, 10, 170, fill=(20, 20, 20), width=3)
    elif valence < 0:  # frown: the upper half, moved down
        draw.arc((mouth[0], cy + r // 4, mouth[2], cy + 3 * r // 4), 190, 350, fill=(20, 20, 20), width=3)
    else:
        draw.line((mouth[0], cy + r // 3, mouth[2], cy + r // 3), fill=(20, 20, 20), width=3)


def _draw_arrow(draw: ImageDraw.ImageDraw, valence: float, rng: np.random.Generator) -> None:
    half = int(rng.integers(14, 26))
    cx, cy = (int(v) for v in rng.integers(half + 2, IMAGE_SIZE - half - 2, 2))
    colour = _random_colour(rng)
    direction = {1.0: (0, -1), -1.0: (0, 1), 0.0: (1, 0)}[valence]   # up, down, sideways
    dx, dy = direction
    tip = (cx + dx * half, cy + dy * half)
    draw.line((cx - dx * half, cy - dy * half, *tip), fill=colour, width=5)
    wing = half // 2
    # The two wings point back from the tip, perpendicular offsets on either side.
    left = (tip[0] - dx * wing - dy * wing, tip[1] - dy * wing - dx * wing)
    right = (tip[0] - dx * wing + dy * wing, tip[1] - dy * wing + dx * wing)
    draw.polygon((tip, left, right), fill=colour)


def _jpeg_bytes(image: Image.Image) -> bytes:
    # Fixed quality and subsampling, no optimisation pass and no metadata: the same pixels give the same bytes.
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, subsampling=2, optimize=False)
    return buffer.getvalue()


def write_generated(path: Path, data: bytes) -> None:
    """Atomic, without fsync: the demo data is made again from its seed if a crash loses it."""
    write_bytes_atomic(path, data, durable=False)


def _label_file(pairs: list[DemoPair]) -> bytes:
    rows = ["ID\ttext,image"] + [f"{p.id}\t{p.file_text_label},{p.file_image_label}" for p in pairs]
    return ("\n".join(rows) + "\n").encode("ascii")


def write_demo_dataset(dest: Path, *, n: int = 1500, seed: int = 0) -> Path:
    """Write about n pairs under dest/MVSA_Single (the loader's --root) and dest/demo_manifest.json; return the folder.

    Writing again with the same (n, seed) gives byte-identical files.
    """
    root = Path(dest) / FOLDER
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    pairs = plan_pairs(n, seed)
    for index, pair in enumerate(pairs):
        write_generated(data / f"{pair.id}.txt", pair.text.encode(pair.encoding))
        image = draw_image(pair.image_label, np.random.default_rng((seed, index, 2)))
        write_generated(data / f"{pair.id}.jpg", _jpeg_bytes(image))
    write_generated(root / "labelResultAll.txt", _label_file(pairs))
    manifest = {"generator": "fusion.extract.datasets.demo_data", "version": 1, "n": n, "seed": seed,
                "pairs": [asdict(pair) for pair in pairs]}
    write_generated(Path(dest) / MANIFEST_NAME, json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))
    return root


def read_manifest(dest: Path) -> list[DemoPair]:
    """The pairs recorded by write_demo_dataset(dest), e.g. to check what a model should have learned."""
    manifest = json.loads((Path(dest) / MANIFEST_NAME).read_text(encoding="utf-8"))
    return [DemoPair(**pair) for pair in manifest["pairs"]]


def load_demo(root: Path, *, seed: int = 0) -> DatasetSamples:
    """The embedded synthetic dataset: written into `root` when absent, read by the real MVSA-Single reader, and
    named `demo` so that nothing downstream mistakes it for MVSA-Single."""
    folder = root / "MVSA_Single"
    if not (folder / "labelResultAll.txt").exists():
        write_demo_dataset(root, seed=seed)
    return dataclasses.replace(load_mvsa(folder, kind="single", seed=seed), name="demo")
