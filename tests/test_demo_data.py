"""The demo dataset: exact MVSA-Single format, deterministic, and a signal that is real in each modality but not
perfect."""

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusion.extract.datasets.demo_data import combine, plan_pairs, read_manifest, write_demo_dataset

LABEL_NAMES = {"positive", "neutral", "negative"}
N = 300


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("demo")
    write_demo_dataset(dest, n=N, seed=3)
    return dest


def parse_label_file(path: Path) -> dict[str, tuple[str, str]]:
    """MVSA-Single's labelResultAll.txt, read without the project's loader."""
    lines = path.read_bytes().decode("utf-8").splitlines()
    assert lines[0] == "ID\ttext,image"
    rows = {}
    for line in lines[1:]:
        fields = line.split("\t")
        assert len(fields) == 2, line
        assert re.fullmatch(r"[1-9][0-9]*", fields[0]), line
        text_label, image_label = fields[1].split(",")
        assert {text_label, image_label} <= LABEL_NAMES, line
        assert fields[0] not in rows, f"duplicate ID {fields[0]}"
        rows[fields[0]] = (text_label, image_label)
    return rows


def test_files_are_in_mvsa_single_format(demo):
    root = demo / "MVSA_Single"
    rows = parse_label_file(root / "labelResultAll.txt")
    assert len(rows) == N
    ids = sorted(int(i) for i in rows)
    assert max(np.diff(ids)) > 1, "IDs should not be contiguous"
    for pair_id in rows:
        assert (root / "data" / f"{pair_id}.txt").is_file()
        assert (root / "data" / f"{pair_id}.jpg").is_file()
    manifest = {p.id: p for p in read_manifest(demo)}
    assert rows == {i: (p.file_text_label, p.file_image_label) for i, p in manifest.items()}


def test_texts_match_manifest_and_some_are_not_utf8(tmp_path):
    # n large enough that the 1% cp1252 share shows up.
    write_demo_dataset(tmp_path, n=400, seed=1)
    pairs = read_manifest(tmp_path)
    assert {p.encoding for p in pairs} == {"utf-8", "cp1252"}
    for pair in pairs:
        raw = (tmp_path / "MVSA_Single" / "data" / f"{pair.id}.txt").read_bytes()
        assert raw.decode(pair.encoding) == pair.text
        if pair.encoding == "cp1252":
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")


def test_images_are_valid_jpegs(demo):
    for path in sorted((demo / "MVSA_Single" / "data").glob("*.jpg"))[:100]:
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.size == (96, 96)
            image.load()
            assert image.mode == "RGB"


def all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writing_is_deterministic_and_idempotent(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    write_demo_dataset(first, n=40, seed=7)
    before = all_bytes(first)
    write_demo_dataset(first, n=40, seed=7)
    write_demo_dataset(second, n=40, seed=7)
    assert all_bytes(first) == before
    assert all_bytes(second) == before
    assert not [name for name in before if name.endswith(".tmp")]
    other = tmp_path / "c"
    write_demo_dataset(other, n=40, seed=8)
    assert all_bytes(other) != before


def mvsa_rule(text: str, image: str) -> str | None:
    """The MVSA cleaning rule, written out apart from the code: equal labels stand, a polar label beats neutral,
    positive against negative is dropped."""
    if {text, image} == {"positive", "negative"}:
        return None
    return text if image in (text, "neutral") else image


def test_combined_labels_follow_the_mvsa_rule_and_are_balanced_like_mvsa_single():
    names = ("negative", "neutral", "positive")
    assert {(t, i): combine(t, i) for t in names for i in names} == {(t, i): mvsa_rule(t, i) for t in names
                                                                      for i in names}
    pairs = plan_pairs(3000, seed=0)
    assert all(p.combined == mvsa_rule(p.file_text_label, p.file_image_label) for p in pairs)
    assert len({(p.file_text_label, p.file_image_label) for p in pairs}) == 9  # every case of the rule occurs
    combined = Counter(p.combined for p in pairs)
    dropped = combined.pop(None) / len(pairs)
    assert 0.03 < dropped < 0.15
    kept = sum(combined.values())
    shares = {name: count / kept for name, count in combined.items()}
    assert 0.5 < shares["positive"] < 0.7
    assert 0.2 < shares["negative"] < 0.4
    assert 0.05 < shares["neutral"] < 0.18


def test_label_file_has_a_little_noise():
    pairs = plan_pairs(3000, seed=0)
    flipped = sum(p.text_label != p.file_text_label for p in pairs) + sum(
        p.image_label != p.file_image_label for p in pairs)
    assert 0.01 < flipped / (2 * len(pairs)) < 0.08


def test_some_pairs_need_both_modalities():
    pairs = [p for p in plan_pairs(2000, seed=0) if p.combined is not None]
    text_alone = np.mean([p.text_label == p.combined for p in pairs])
    image_alone = np.mean([p.image_label == p.combined for p in pairs])
    assert text_alone < 0.9 and image_alone < 0.9
    # A text saying neutral next to a polar image: only the image knows.
    assert any(p.text_label == "neutral" and p.combined == "positive" for p in pairs)
    assert any(p.image_label == "neutral" and p.combined == "negative" for p in pairs)


def warmth(path: Path) -> float:
    """Mean red minus mean blue: a trivial colour statistic."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float(pixels[..., 0].mean() - pixels[..., 2].mean())


def test_image_colour_predicts_image_label_but_not_perfectly(demo):
    pairs = read_manifest(demo)
    stats = np.array([warmth(demo / "MVSA_Single" / "data" / f"{p.id}.jpg") for p in pairs])
    labels = np.array([p.image_label for p in pairs])
    fit, held = np.arange(len(pairs)) % 2 == 0, np.arange(len(pairs)) % 2 == 1
    names = ["negative", "neutral", "positive"]
    centroids = np.array([stats[fit & (labels == name)].mean() for name in names])
    assert centroids[0] < centroids[1] < centroids[2]
    predicted = np.array(names)[np.abs(stats[held, None] - centroids[None, :]).argmin(axis=1)]
    accuracy = np.mean(predicted == labels[held])
    majority = max(Counter(labels[held]).values()) / held.sum()
    assert majority + 0.15 < accuracy < 0.97


POSITIVE_WORDS = {"good", "great", "love", "amazing", "wonderful", "beautiful", "lovely", "happy", "awesome",
                  "fantastic", "brilliant", "enjoying", "smiling", ":)"}
NEGATIVE_WORDS = {"bad", "awful", "terrible", "hate", "horrible", "ugly", "boring", "annoying", "sad",
                  "disappointing", "ugh", ":("}
NEGATIONS = {"not", "never", "isn't", "wasn't", "don't", "can't"}


def keyword_rule(text: str) -> str:
    """A lexicon count where a negation in the two words before a sentiment word flips it."""
    words = re.findall(r"[a-z']+|:\)|:\(", text.lower())
    score = 0
    for i, word in enumerate(words):
        polarity = (word in POSITIVE_WORDS) - (word in NEGATIVE_WORDS)
        if polarity and NEGATIONS & set(words[max(0, i - 2):i]):
            polarity = -polarity
        score += polarity
    return "positive" if score > 0 else "negative" if score < 0 else "neutral"


def test_text_keywords_predict_text_label_but_not_perfectly():
    pairs = plan_pairs(2000, seed=0)
    labels = [p.text_label for p in pairs]
    accuracy = np.mean([keyword_rule(p.text) == label for p, label in zip(pairs, labels)])
    majority = max(Counter(labels).values()) / len(labels)
    assert majority + 0.2 < accuracy < 0.99


def test_rejects_empty_dataset(tmp_path):
    with pytest.raises(ValueError):
        write_demo_dataset(tmp_path, n=0)


def test_project_loader_reads_it(demo):
    datasets = pytest.importorskip("fusion.extract.datasets.registry")
    loaded = datasets.load_dataset("mvsa-single", demo / "MVSA_Single", seed=0)
    kept = {p.id: p for p in read_manifest(demo) if p.combined is not None}
    names = ("negative", "neutral", "positive")
    assert {s.id: (names[s.label], s.text) for s in loaded.samples} == {
        i: (p.combined, p.text) for i, p in kept.items()}
    assert sum(loaded.text_fallbacks.values()) == sum(p.encoding == "cp1252" for p in kept.values())
