"""Text decoding (never fails, counts fallbacks) and the image loader (any mode, truncated, bombs refused, formats
outside the allow-list refused, memory bounded)."""

import io
import pickle
import re
import tracemalloc
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import EpsImagePlugin, Image, ImageFile, JpegImagePlugin

from dataset_writers import write_image, write_truncated
from hostile_images import EPS, matrix
from fusion.errors import LabelFileError
from fusion.extract import images
from fusion.extract.images import ImageFolder, ImageUnreadable, load_rgb
from fusion.extract.datasets.textio import decode_document, decode_text, is_html_fragment, read_csv

# ---------------------------------------------------------------- text


@pytest.mark.parametrize(
    "raw, text, encoding",
    [
        (b"hello world", "hello world", "utf-8"),
        (b"\xef\xbb\xbf  caf\xc3\xa9 \r\n", "café", "utf-8"),
        (b"", "", "utf-8"),
        (b" \n\t ", "", "utf-8"),
        ("Café au lait à Paris".encode("latin-1"), "Café au lait à Paris", "cp1252"),
        ("It’s “great” — really".encode("cp1252"), "It’s “great” — really", "cp1252"),
        ("今天天气很好，心情愉快".encode("gbk"), "今天天气很好，心情愉快", "gb18030"),
        (b"ok \x81 \x9d", "ok \x81 \x9d", "latin-1"),  # bytes undefined in cp1252
        ("emoji 😀 ok".encode("utf-16"), "emoji 😀 ok", "utf-16"),
    ],
)
def test_decode_text(raw, text, encoding):
    assert decode_text(raw) == (text, encoding)


def test_latin1_that_also_decodes_as_gbk_is_not_taken_for_chinese():
    raw = "résumés naïve".encode("latin-1")
    raw.decode("gb18030")  # the trap is real: these bytes are valid GB18030
    assert decode_text(raw) == ("résumés naïve", "cp1252")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decode_text_never_fails(raw):
    text, encoding = decode_text(raw)
    assert isinstance(text, str) and text == text.strip()
    assert encoding in {"utf-8", "utf-16", "gb18030", "cp1252", "latin-1"}


def test_decode_document_counts_only_the_lines_that_are_not_utf8():
    raw = "a,b\nplain,ok\n".encode() + "caf\xe9,x\n".encode("latin-1") + "中文,y\n".encode()
    text, used = decode_document(raw)
    assert text.splitlines() == ["a,b", "plain,ok", "café,x", "中文,y"]
    assert used == {"cp1252": 1}


@pytest.mark.parametrize(
    "text, html",
    [
        ('<html><head><meta content="text/html; charset=UTF-8" http-equiv="content-type">', True),
        ('  <meta content="text/html; charset=utf-8"> junk', True),
        ("<!DOCTYPE html><html>", True),
        ("when the <b>code</b> compiles", False),
        ("html memes are the best", False),
    ],
)
def test_is_html_fragment(text, html):
    assert is_html_fragment(text) is html


def test_read_csv_reports_the_start_line_of_records_after_multiline_cells(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('a,b\n1,"two\nlines"\n3\n', encoding="utf-8")
    with pytest.raises(LabelFileError, match=r"t\.csv: line 4: expected 2 fields"):
        read_csv(path, ("a", "b"))


def test_read_csv_unterminated_quote_is_a_label_file_error(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('a,b\n1,2\n3,"' + "x" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(LabelFileError, match=r"t\.csv: line 3: malformed CSV"):
        read_csv(path, ("a", "b"))


# ---------------------------------------------------------------- images


def _save(tmp_path: Path, image: Image.Image, name: str, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    out = load_rgb(_save(tmp_path, image, "p.png", transparency=0))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)


@pytest.mark.parametrize(
    "mode, colour, name, expected",
    [
        ("LA", (100, 0), "la.png", (255, 255, 255)),  # fully transparent -> white
        ("LA", (100, 255), "la2.png", (100, 100, 100)),
        ("RGBA", (10, 20, 30, 255), "rgba.png", (10, 20, 30)),
        ("L", 77, "l.png", (77, 77, 77)),
        ("1", 1, "one.png", (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), "cmyk.jpg", (255, 0, 0)),
    ],
)
def test_modes_become_rgb(tmp_path, mode, colour, name, expected):
    out = load_rgb(_save(tmp_path, Image.new(mode, (16, 16), colour), name))
    assert out.mode == "RGB"
    assert np.allclose(out.getpixel((8, 8)), expected, atol=3)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)
    path = _save(tmp_path, Image.fromarray(values), "grey16.png")
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_rgb(path))
    assert out[0, :, 0].tolist() == [0, 128, 255, 4]


def test_truncated_image_loads_without_leaking_the_global_flag(tmp_path):
    path = write_truncated(tmp_path / "cut.jpg", 3)
    with pytest.raises(OSError):  # really truncated: plain Pillow refuses it
        Image.open(path).load()
    assert load_rgb(path).size == (20, 24)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_inside_the_header_is_beyond_repair(tmp_path):
    path = write_image(tmp_path / "cut.jpg", 3)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageUnreadable, match="^truncated beyond repair$"):
        load_rgb(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"just some text, not pixels\n", "not an image (cannot identify image file)"),
        (None, "missing file"),
    ],
)
def test_unreadable_files_have_a_short_reason(tmp_path, content, reason):
    path = tmp_path / "x.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageUnreadable) as caught:
        load_rgb(path)
    assert str(caught.value) == reason


def test_a_folder_named_like_an_image_is_unreadable(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageUnreadable, match=r"^cannot read file \(Is a directory\)$"):
        load_rgb(tmp_path / "dir.jpg")


@pytest.mark.parametrize("name", ["anim.gif", "anim.webp"])
def test_animation_gives_its_first_frame(tmp_path, name):
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    path = tmp_path / name
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0, lossless=True)
    assert Image.open(path).n_frames == 3
    out = load_rgb(path)
    assert np.allclose(out.getpixel((4, 4)), (250, 0, 0), atol=8)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no pixel data): a cheap decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_huge_png_header_is_refused_as_a_bomb(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(100_000, 100_000))  # over twice Pillow's limit: Pillow raises
    with pytest.raises(ImageUnreadable, match=r"^decompression bomb \(10000000000 pixels\)$"):
        load_rgb(path)


def test_png_header_just_over_the_limit_is_refused_too(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(10_000, 10_000))  # between 1x and 2x: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(
        ImageUnreadable, match=r"^decompression bomb \(10000 x 10000 pixels\)$"
    ):
        load_rgb(path)


def test_bomb_over_our_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    path = write_image(tmp_path / "ok.png", 1)
    monkeypatch.setattr(images, "MAX_PIXELS", 100)

    def must_not_decode(self):
        raise AssertionError("a bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    with pytest.raises(ImageUnreadable, match=r"^decompression bomb \(20 x 24 pixels\)$"):
        load_rgb(path)


def test_png_saved_with_a_jpg_extension_loads(tmp_path):
    path = tmp_path / "really_png.jpg"
    Image.new("RGB", (5, 6), (1, 2, 3)).save(path, "PNG")
    assert load_rgb(path).getpixel((0, 0)) == (1, 2, 3)


def test_loaded_image_is_detached_from_its_file(tmp_path):
    path = write_image(tmp_path / "a.png", 2)
    out = load_rgb(path)
    path.unlink()
    assert out.copy().size == (20, 24)


def test_image_unreadable_survives_pickling():
    error = pickle.loads(pickle.dumps(ImageUnreadable("empty file")))
    assert isinstance(error, ImageUnreadable) and str(error) == "empty file"


def test_concurrent_loads_of_good_and_truncated_images(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(6)]
    paths += [write_truncated(tmp_path / f"t{i}.jpg", i) for i in range(6)]
    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda p: load_rgb(p).size, paths * 3))
    assert sizes == [(20, 24)] * len(paths) * 3
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_image_folder_resolves_case_and_extension_variants(tmp_path):
    for name in ("a.jpg", "B.PNG", "c.jpeg", "c.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    folder = ImageFolder(tmp_path)
    assert folder.resolve("a.jpg") == tmp_path / "a.jpg"
    assert folder.resolve("b.png") == tmp_path / "B.PNG"
    assert folder.resolve("B.jpg") == tmp_path / "B.PNG"
    assert folder.resolve("c.bmp") == tmp_path / "c.jpeg"  # the preferred of two candidates
    assert folder.resolve("notes.jpg") is None  # only image extensions stand in
    assert folder.resolve("zzz.jpg") is None
    assert ImageFolder(tmp_path / "nope").resolve("a.jpg") is None


# ---------------------------------------------------------------- the hostile matrix, formats, memory


@pytest.mark.parametrize("case", matrix(), ids=lambda case: case.name)
def test_every_file_of_the_matrix_decodes_to_rgb_or_is_refused_with_its_reason(tmp_path, case):
    path = tmp_path / case.filename
    path.write_bytes(case.data)
    if case.reason:
        with pytest.raises(ImageUnreadable, match="^" + re.escape(case.reason)):
            load_rgb(path)
        return
    decoded = np.asarray(load_rgb(path))
    assert decoded.dtype == np.uint8 and decoded.shape[2] == 3
    tolerance = 3 if case.filename.endswith(".jpg") else 0  # JPEG's own rounding
    if case.first_pixel:
        assert np.abs(decoded[0, 0].astype(int) - case.first_pixel).max() <= tolerance, decoded[0, 0]
    if case.last_pixel:
        assert np.abs(decoded[-1, -1].astype(int) - case.last_pixel).max() <= tolerance, decoded[-1, -1]


def test_postscript_is_never_parsed_whatever_the_file_is_called(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self))
    for name in ("figure.eps", "photo.jpg", "scan.tif", "noname"):
        (tmp_path / name).write_bytes(EPS)
        with pytest.raises(ImageUnreadable, match=r"^image format not accepted \(looks like EPS; accepted: JPEG, PNG, "
                                                  r"GIF, WebP, BMP, TIFF\)$"):
            load_rgb(tmp_path / name)
    with pytest.raises(ImageUnreadable, match="looks like EPS"):
        load_rgb(EPS)
    assert opened == []
    monkeypatch.undo()
    assert Image.open(tmp_path / "photo.jpg").format == "EPS"  # Pillow alone would have parsed it


def test_other_formats_pillow_reads_are_refused_by_name(tmp_path):
    for fmt in ("PCX", "PPM", "ICO"):
        data = io.BytesIO()
        Image.new("RGB", (16, 16)).save(data, fmt)
        with pytest.raises(ImageUnreadable, match=rf"^image format not accepted \(looks like {fmt};"):
            load_rgb(data.getvalue())
    assert images.refused_format(b"%!PS-Adobe-3.0") == "EPS" and images.refused_format(b"just text") is None


def test_an_upload_is_decoded_from_its_file_object_which_stays_open(tmp_path):
    upload = io.BytesIO()
    Image.new("RGB", (6, 5), (7, 8, 9)).save(upload, "PNG")
    upload.seek(3)  # wherever the form parser left it
    assert load_rgb(upload).getpixel((0, 0)) == (7, 8, 9) and not upload.closed
    with pytest.raises(ImageUnreadable, match="^empty file$"):
        load_rgb(io.BytesIO())
    upload = io.BytesIO(EPS)
    with pytest.raises(ImageUnreadable, match="looks like EPS"):
        load_rgb(upload)


def test_a_lower_pixel_limit_refuses_from_the_header(tmp_path, monkeypatch):
    path = write_image(tmp_path / "ok.png", 1)  # 20 x 24

    def must_not_decode(self):
        raise AssertionError("decoded past the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    with pytest.raises(ImageUnreadable, match=r"^too many pixels \(20 x 24, over the limit of 479\)$"):
        load_rgb(path, max_pixels=479)


def test_large_images_are_reduced_by_a_whole_factor_right_after_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "REDUCED_SHORT_SIDE", 16)
    png = tmp_path / "big.png"
    Image.new("RGB", (130, 100), (10, 200, 30)).save(png)
    out = load_rgb(png)
    assert out.size == (-(-130 // 6), -(-100 // 6)) and out.getpixel((3, 3)) == (10, 200, 30)  # 100 // 16 = 6
    assert load_rgb(write_image(tmp_path / "small.png", 1, size=(31, 40))).size == (31, 40)  # short side < 32
    jpeg = tmp_path / "big.jpg"
    Image.new("RGB", (160, 128), (200, 20, 20)).save(jpeg, quality=95)
    drafted = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        drafted.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    assert load_rgb(jpeg).size == (20, 16) and drafted == [(20, 16)]  # decoded at 1/8 scale by the JPEG decoder


def test_wide_greys_are_reduced_before_they_are_scaled_to_8_bits(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "REDUCED_SHORT_SIDE", 16)
    seen = []
    real = images.grey_to_uint8
    monkeypatch.setattr(images, "grey_to_uint8", lambda values, mode: seen.append(values.shape) or real(values, mode))
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((64, 96), 40_000, dtype=np.uint16)).save(path)
    out = load_rgb(path)
    assert seen == [(16, 24)] and out.size == (24, 16) and out.getpixel((0, 0)) == (156, 156, 156)


def test_converting_a_float_image_to_8_bits_makes_no_whole_copy_in_floating_point():
    values = np.linspace(-5.0, 300.0, 3000 * 3000, dtype=np.float32).reshape(3000, 3000)  # 36 MB
    tracemalloc.start()
    try:
        out = images.grey_to_uint8(values, "F")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out[0, 0] == 0 and out[-1, -1] == 255
    assert peak < values.nbytes, peak  # with the 9 MB answer: a float64 copy would make it 81 MB, a float32 one 45
