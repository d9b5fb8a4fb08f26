"""Bad inputs, generated: label files, texts and images as scraped from the web. Each one ends in its one-line
message (LabelFileError/DatasetError naming the file and line) or its recorded skip; never a traceback or a hang,
and nothing already written is lost. tests/test_datasets.py and tests/test_images_text.py hold the hand-written
cases; these tests generate variations (hypothesis) and push the worst through `fusion extract`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dataset_writers import write_generic_csv, write_image, write_memotion, write_mvsa, write_truncated
from fault_helpers import FIGURES, damage, header_claiming, image_bytes, png_claiming, print_figures
from hostile_images import matrix
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_models import extract_argv

from fusion.cache.reader import read_cache
from fusion.cli import main
from fusion.errors import DatasetError, LabelFileError
from fusion.extract.datasets.registry import load_dataset
from fusion.extract.images import ImageUnreadable, load_rgb
from fusion.labels import SPLITS

GENERATED = settings(max_examples=80, deadline=None, derandomize=True,  # the same examples on every CI run
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def figures():
    start = FIGURES.copy()
    yield
    print_figures(__name__, start)


# ---------------------------------------------------------------- label files

# One valid dataset per format; each example overwrites its label file, loads, and puts the original back.
WRITERS = {
    "mvsa-single": lambda root: write_mvsa(root, kind="single", n_per_class=3, dirty=False),
    "mvsa-multi": lambda root: write_mvsa(root, kind="multi", n_per_class=3, dirty=False),
    "memotion": lambda root: write_memotion(root, n_per_class=3, dirty=False),
    "csv": lambda root: write_generic_csv(root, n_per_class=3, dirty=False, with_split=True),
}
SEPARATORS = {"mvsa-single": b"\t", "mvsa-multi": b"\t", "memotion": b",", "csv": b","}
# Text a scraper may put in a line: any character but the two that end lines (\x0c, \x85, U+2028 included).
LINE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=30)


@pytest.fixture(scope="module", params=list(WRITERS))
def valid_dataset(request, tmp_path_factory):
    expected = WRITERS[request.param](tmp_path_factory.mktemp(request.param))
    label_file = expected.label_files[0]
    return request.param, expected, label_file, label_file.read_bytes()


@st.composite
def damaged_label_file(draw, original: bytes, separator: bytes):
    """(bytes, the 1-based line that was changed or None when the damage is not confined to one line)."""
    lines = original.rstrip(b"\n").split(b"\n")
    kind = draw(st.sampled_from(["empty", "binary", "cut", "separator", "drop field", "add field", "replace field",
                                 "insert line", "bytes in line", "encoding"]))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"  \n\n", b"\xef\xbb\xbf"])), None
    if kind == "binary":
        return draw(st.binary(min_size=1, max_size=300)), None
    if kind == "cut":
        return original[:draw(st.integers(0, len(original) - 1))], None
    if kind == "encoding":  # the whole file in another encoding: UTF-16 loads (BOM), latin-1 of ASCII is ASCII
        return original.decode().encode(draw(st.sampled_from(["utf-16", "utf-16-le", "latin-1", "utf-8-sig"]))), None
    number = draw(st.integers(0, len(lines) - 1))
    line, fields = lines[number], lines[number].split(separator)
    if kind == "separator":
        lines[number] = line.replace(separator, draw(st.sampled_from([b";", b" ", b"|", b"  ", b"\t", b","])))
    elif kind == "drop field" and len(fields) > 1:
        del fields[draw(st.integers(0, len(fields) - 1))]
        lines[number] = separator.join(fields)
    elif kind == "add field":
        lines[number] = line + separator + draw(LINE_TEXT).encode()
    elif kind == "replace field":
        fields[draw(st.integers(0, len(fields) - 1))] = draw(LINE_TEXT).encode()
        lines[number] = separator.join(fields)
    elif kind == "insert line":
        lines.insert(number, draw(LINE_TEXT).encode())
    elif kind == "bytes in line":
        at = draw(st.integers(0, len(line)))
        lines[number] = line[:at] + draw(st.binary(min_size=1, max_size=12)).replace(b"\n", b"").replace(
            b"\r", b"") + line[at:]
    return b"\n".join(lines) + b"\n", number + 1


def check_outcome(load, label_file: Path, damaged: bytes, changed_line: int | None) -> str:
    """Loads; returns "loaded" or "refused" after checking the message (one line, file, a line that exists)."""
    try:
        data = load()
    except (LabelFileError, DatasetError) as error:
        message = str(error)
        assert "\n" not in message and "Traceback" not in message, message
        if isinstance(error, LabelFileError):
            assert message.startswith(f"{label_file}: line "), message
            line = int(re.match(r".*?: line (\d+): ", message).group(1))
            lines = damaged.count(b"\n") + 1
            assert 1 <= line <= lines, f"line {line} of a {lines}-line file: {message}"
            # A changed row is the line named (or the header's, line 1); a changed header can make any row wrong.
            if changed_line not in (None, 1) and "duplicate" not in message:
                assert line in (1, changed_line), f"changed line {changed_line}, message: {message}"
        return "refused"
    for sample in data.samples:
        assert sample.label in (0, 1, 2) and sample.split in SPLITS and isinstance(sample.id, str)
    for _, split, reason in data.skipped:
        assert split in SPLITS and reason
    return "loaded"


@GENERATED
@given(data=st.data())
def test_damaged_label_files_load_or_stop_with_file_and_line(valid_dataset, data):
    name, expected, label_file, original = valid_dataset
    damaged, changed_line = data.draw(damaged_label_file(original, SEPARATORS[name]))
    label_file.write_bytes(damaged)
    FIGURES["generated bad inputs tried"] += 1
    try:
        outcome = check_outcome(lambda: load_dataset(name, expected.root), label_file, damaged, changed_line)
        FIGURES[f"label files {outcome}"] += 1
    finally:
        label_file.write_bytes(original)


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_bad_label_file_stops_fusion_extract_in_one_line_before_loading_models(name, tmp_path, capsys):
    expected = WRITERS[name](tmp_path / "data")
    expected.label_files[0].write_bytes(b"\x89PNG\x1a\x00\x00 not a label file")
    code = main(["extract", "--dataset", name, "--root", str(expected.root), "--out", str(tmp_path / "c.h5"),
                 "--text-model", str(tmp_path / "no-model"), "--image-model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and str(expected.label_files[0]) in err, err
    assert "line 1: binary data" in err and not (tmp_path / "c.h5.partial").exists()


@pytest.mark.parametrize("name", ["memotion", "csv"])
def test_an_image_name_too_long_for_the_os_is_a_missing_image(name, tmp_path):
    expected = WRITERS[name](tmp_path / "data")
    label_file = expected.label_files[0]
    lines = label_file.read_text().split("\n")
    first = lines[1].split(",")
    column = 1 if name == "memotion" else 0  # memotion: ",image_name,..."; csv: "image,text,label,split"
    first[column] = "x" * 300 + ".jpg" if name == "memotion" else "imgs/" + "d" * 300 + "/p.jpg"
    label_file.write_text("\n".join([lines[0], ",".join(first)] + lines[2:]))
    data = load_dataset(name, expected.root)
    assert [reason for sid, _, reason in data.skipped if len(sid) > 255] == ["missing image file"]


# ---------------------------------------------------------------- images


FORMATS = ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]


@st.composite
def damaged_image(draw):
    return damage(draw, image_bytes(draw(st.sampled_from(FORMATS))), max_edits=6, garbage_size=200)


@pytest.fixture(scope="module")
def processor(tiny_models):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(tiny_models[1], backend="pil")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's own notes on damaged TIFF tags and near-bombs
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=damaged_image(), extension=st.sampled_from([".jpg", ".png", ".gif", ".webp", ".bmp", ".txt", ""]))
def test_a_damaged_image_decodes_or_is_unreadable_with_a_reason(tmp_path, processor, data, extension):
    path = tmp_path / f"image{extension}"
    path.write_bytes(data)
    FIGURES["generated bad inputs tried"] += 1
    started = time.monotonic()
    try:
        image = load_rgb(path)
    except ImageUnreadable as error:
        assert str(error) and "\n" not in str(error)
        FIGURES["images unreadable (skipped with reason)"] += 1
    else:
        assert image.mode == "RGB"
        assert processor(images=image, return_tensors="pt")["pixel_values"].shape[-2:] == (28, 28)
        FIGURES["images decoded anyway"] += 1
    assert time.monotonic() - started < 10


BOMB_SIZES = st.one_of(
    st.tuples(st.integers(9_500, 65_535), st.integers(9_500, 65_535)),  # over 89 M pixels
    st.integers(101, 65_535).flatmap(lambda n: st.sampled_from([(1, n), (n, 1)])),  # 1 pixel wide, > 100:1
    st.integers(2, 600).flatmap(lambda n: st.tuples(st.just(n), st.integers(101 * n, 65_535))),  # tall, > 100:1
)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's note; the refusal is ours
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["PNG", "GIF", "BMP", "JPEG"]), size=BOMB_SIZES)
def test_a_header_claiming_an_enormous_or_degenerate_image_is_refused_without_decoding(tmp_path, fmt, size):
    width, height = size
    if width * height <= 89_478_485 and max(size) <= 100 * min(size):
        return
    path = tmp_path / f"bomb.{fmt.lower()}"
    path.write_bytes(header_claiming(fmt, width, height))
    FIGURES["generated bad inputs tried"] += 1
    started = time.monotonic()
    with pytest.raises(ImageUnreadable, match=r"^(decompression bomb|extreme aspect ratio) \("):
        load_rgb(path)
    assert time.monotonic() - started < 2


BOMB_SCRIPT = r"""
import resource, sys, time, warnings
warnings.simplefilter("ignore")
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB: a decoded 60000 x 60000 image needs 10 GiB
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from fault_helpers import header_claiming
from fusion.extract.images import ImageUnreadable, load_rgb
def peak_kb():  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would start at pytest's own peak
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])
before = peak_kb()
started = time.monotonic()
reasons = []
for fmt, size in [("PNG", (60000, 60000)), ("GIF", (60000, 60000)), ("BMP", (60000, 60000)),
                  ("JPEG", (60000, 60000)), ("PNG", (1, 4000000)), ("GIF", (65535, 2))]:
    path = Path(sys.argv[2]) / ("bomb." + fmt.lower())
    path.write_bytes(header_claiming(fmt, *size))
    try:
        load_rgb(path)
        reasons.append("DECODED")
    except ImageUnreadable as error:
        reasons.append(str(error))
grown = peak_kb() - before
print(time.monotonic() - started, grown // 1024, "|".join(reasons))
"""


def test_decompression_bombs_cost_neither_memory_nor_time(tmp_path):
    """In a fresh process with 1 GiB of address space: six bombs refused in well under a second, peak memory
    grown by less than 50 MB."""
    done = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(Path(__file__).parent), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seconds, grown_mb, reasons = done.stdout.split(maxsplit=2)
    reasons = reasons.strip().split("|")
    assert all(r.startswith(("decompression bomb", "extreme aspect ratio")) for r in reasons), reasons
    assert float(seconds) < 1.0 and int(grown_mb) < 50, (seconds, grown_mb)
    FIGURES["bombs refused (memory/time checked)"] += len(reasons)


# ---------------------------------------------------------------- texts


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models[0])


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=3000), st.text(max_size=3000).map(lambda t: t.encode("utf-8", "replace")),
                     st.sampled_from([b"", b"\xff\xfe", b"\xef\xbb\xbf", b"\x00" * 50, "a" * 100_000,
                                      ("good day " * 12_000)]).map(lambda v: v.encode() if isinstance(v, str) else v)))
def test_any_text_bytes_decode_and_tokenize_within_max_length(tokenizer, raw):
    from fusion.extract.datasets.textio import decode_text

    FIGURES["generated bad inputs tried"] += 1
    text, _ = decode_text(raw)
    ids = tokenizer([text], truncation=True, max_length=32)["input_ids"][0]
    assert 2 <= len(ids) <= 32  # [CLS] ... [SEP], never longer than asked


# ---------------------------------------------------------------- all of it through `fusion extract`


def write_dirty_csv(root: Path) -> tuple[Path, dict[str, str | None]]:
    """A generic CSV whose rows point at every kind of bad image and carry every kind of bad text; returns the
    file and, per id, None (must be embedded) or the start of its skip reason."""
    images = root / "imgs"
    good = [write_image(images / f"good{i}.jpg", i) for i in range(6)]
    (images / "png_named.jpg").write_bytes(image_bytes("PNG"))
    write_truncated(images / "truncated.jpg", 7)
    cases = {  # image file name -> (bytes or None to leave it absent, expected outcome)
        "empty.jpg": (b"", "empty image file"),
        "text.jpg": (b"hello, this is not a picture\n", "not an image"),
        "page.png": (b"<html><head><meta content='text/html'></head></html>", "not an image"),
        "archive.jpg": (b"PK\x03\x04" + bytes(60), "not an image"),
        "header_only.png": (image_bytes("PNG")[:20], None),
        "bomb.png": (png_claiming(60_000, 60_000), "decompression bomb"),
        "bomb.gif": (header_claiming("GIF", 60_000, 60_000), "decompression bomb"),
        "bomb.bmp": (header_claiming("BMP", 60_000, 60_000), "decompression bomb"),
        "strip.png": (None, "extreme aspect ratio"),
        "absent.jpg": (None, "missing image file"),
    }
    for name, (content, _) in cases.items():
        if content is not None:
            (images / name).write_bytes(content)
    Image.new("L", (2, 3000)).save(images / "strip.png")
    (images / "folder.jpg").mkdir()
    texts = [b"good day " * 12_000, b"a" * 100_000, "caf\xe9 na\xefve \x81\x9d".encode("latin-1"), b"",
             "emoji \U0001f600 \u202eRTL\u202c \x0b\x0c tab\tend".encode(), b"plain text"]
    rows = [(f"imgs/{path.name}", texts[i % len(texts)], ("train", "train", "train", "val", "test", "train")[i])
            for i, path in enumerate(good)]
    rows += [(f"imgs/{name}", b"some text", "train") for name in [*cases, "png_named.jpg", "truncated.jpg",
                                                                    "folder.jpg"]]
    lines = [b"image,text,label,split"]
    for number, (image, text, split) in enumerate(rows):
        cell = b'"' + text.replace(b'"', b'""') + b'"'
        lines.append(b",".join([image.encode(), cell, (b"negative", b"neutral", b"positive")[number % 3],
                                split.encode()]))
    csv_file = root / "data.csv"
    csv_file.write_bytes(b"\n".join(lines) + b"\n")
    outcomes = {f"imgs/{name}": expected for name, (_, expected) in cases.items()}
    outcomes.update({f"imgs/{path.name}": None for path in good}, **{"imgs/png_named.jpg": None,
                                                                      "imgs/truncated.jpg": None,
                                                                      "imgs/folder.jpg": "missing image file"})
    return csv_file, outcomes


def test_extract_over_every_bad_image_and_text_records_each_and_keeps_the_rest(tmp_path, tiny_models, capsys):
    bert, dinov2 = tiny_models
    csv_file, outcomes = write_dirty_csv(tmp_path)
    out = tmp_path / "dirty.h5"
    argv = ["extract", "--dataset", "csv", "--root", str(csv_file), "--out", str(out), "--text-model", str(bert),
            "--image-model", str(dinov2), "--device", "cpu", "--workers", "1", "--batch-size", "4", "--tokens",
            "--max-length", "100"]  # more than the tiny BERT's 64 positions: lowered, not a crash
    started = time.monotonic()
    assert main(argv) == 0, capsys.readouterr().err
    assert time.monotonic() - started < 120
    FIGURES["handmade bad images and texts through fusion extract"] += len(outcomes) + 5
    cache = read_cache(out, tokens=True)
    assert cache.attrs["max_length"] == 64
    skipped = {sid: reason for sid, _, reason in cache.skipped}
    embedded = {str(sid) for split in cache.splits.values() for sid in split.id}
    assert embedded | set(skipped) == set(outcomes) and not embedded & set(skipped)
    for sid, expected in outcomes.items():
        if expected is None and sid != "imgs/header_only.png":  # a 20-byte PNG may go either way; nothing else
            assert sid in embedded, (sid, skipped.get(sid))
        elif expected is not None:
            assert skipped.get(sid, "").startswith(expected), (sid, skipped.get(sid))
    train = cache.splits["train"]
    lengths = {str(sid): int(mask.sum()) for sid, mask in zip(train.id, train.text_mask)}
    assert lengths["imgs/good0.jpg"] == 64  # 100k characters of words, truncated to the model's positions
    assert lengths["imgs/good1.jpg"] == 3  # one 100k-letter "word": [CLS] [UNK] [SEP]
    # Nothing already written is lost: a later run with a broken label file stops and leaves the cache as it was.
    before = out.read_bytes()
    csv_file.write_bytes(csv_file.read_bytes() + b"imgs/new.jpg,text,ecstatic,train\n")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 21: unknown label 'ecstatic'" in err[0] and str(csv_file) in err[0]
    assert out.read_bytes() == before and not (tmp_path / "dirty.h5.partial").exists()


def write_matrix_csv(root: Path) -> tuple[Path, dict[str, str | None]]:
    """A generic CSV over the hostile matrix (tests/hostile_images.py) and a few good images: per id, None (must be
    embedded) or the start of its skip reason."""
    images = root / "imgs"
    good = [write_image(images / f"good{i}.jpg", i) for i in range(3)]
    outcomes = {f"imgs/{path.name}": None for path in good}
    for case in matrix():
        (images / case.filename).write_bytes(case.data)
        outcomes[f"imgs/{case.filename}"] = case.reason
    labels = ("negative", "neutral", "positive")
    lines = ["image,text,label,split"] + [f"{name},post {i},{labels[i % 3]},{('train', 'val', 'test')[i % 3]}"
                                          for i, name in enumerate(outcomes)]
    (root / "data.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "data.csv", outcomes


def test_extract_decodes_or_skips_with_its_reason_every_file_of_the_matrix(tmp_path, tiny_models, monkeypatch):
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self))
    csv_file, outcomes = write_matrix_csv(tmp_path)
    out = tmp_path / "matrix.h5"
    assert main(extract_argv(csv_file, out, tiny_models, "--batch-size", "4", dataset="csv")) == 0
    cache = read_cache(out)
    skipped = {sid: reason for sid, _, reason in cache.skipped}
    embedded = {str(sid) for split in cache.splits.values() for sid in split.id}
    assert embedded | set(skipped) == set(outcomes) and not embedded & set(skipped)
    for sid, reason in outcomes.items():
        if reason is None:
            assert sid in embedded, (sid, skipped.get(sid))
        else:
            assert skipped.get(sid, "").startswith(reason), (sid, skipped.get(sid))
    assert opened == []  # PostScript, whatever its name, never reached its parser (nor Ghostscript)
    FIGURES["hostile matrix files through fusion extract"] += len(outcomes)


def test_a_decode_worker_meeting_an_unexpected_error_skips_the_row_with_the_errors_type(tmp_path, tiny_models,
                                                                                      monkeypatch):
    from fusion.extract import batches

    csv_file, outcomes = write_matrix_csv(tmp_path)
    real = batches.load_rgb

    def breaks_on_one(path, **kwargs):
        if Path(path).name == "good1.jpg":
            raise ZeroDivisionError("float division by zero")  # a bug meeting one file
        return real(path, **kwargs)

    monkeypatch.setattr(batches, "load_rgb", breaks_on_one)
    out = tmp_path / "c.h5"
    assert main(extract_argv(csv_file, out, tiny_models, dataset="csv")) == 0
    cache = read_cache(out)
    skipped = {sid: reason for sid, _, reason in cache.skipped}
    assert skipped["imgs/good1.jpg"] == "image could not be decoded (ZeroDivisionError)"
    embedded = {str(sid) for split in cache.splits.values() for sid in split.id}
    assert {"imgs/good0.jpg", "imgs/good2.jpg"} <= embedded
