"""Bytes to text without ever failing a sample, and label CSVs read with line numbers.

Decoding order: UTF-8 (BOM removed), UTF-16 only with its BOM, GB18030 only when the result looks like Chinese,
cp1252, then latin-1, which maps every byte and so always succeeds. The encoding actually used is returned so
readers can count the texts that were not UTF-8.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fusion.errors import LabelFileError

# CJK ideographs, CJK symbols/punctuation, fullwidth forms: what GB18030-encoded social-media text decodes to.
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]{2,}")
_HTML_FRAGMENT = re.compile(r"^\s*<(!doctype\s+html|html[\s>]|head[\s>]|meta\s)|<meta\s[^>]*text/html", re.I)


def decode_text(raw: bytes) -> tuple[str, str]:
    """Decode a text file's bytes; returns (stripped text, encoding used). Never raises."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16").strip(), "utf-16"
        except UnicodeDecodeError:
            pass
    try:
        return raw.decode("utf-8-sig").strip(), "utf-8"
    except UnicodeDecodeError:
        pass
    gb = _decode_or_none(raw, "gb18030")
    if gb is not None and _looks_chinese(gb):
        return gb.strip(), "gb18030"
    cp = _decode_or_none(raw, "cp1252")
    if cp is not None:
        return cp.strip(), "cp1252"
    return raw.decode("latin-1").strip(), "latin-1"


def _decode_or_none(raw: bytes, encoding: str) -> str | None:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError:
        return None


def _looks_chinese(text: str) -> bool:
    """Plausible GB18030: every non-ASCII character is CJK, and most ideographs come in runs (words).

    Latin-1 bytes often decode cleanly as GBK too ("résumé": each accented letter swallows the next ASCII
    letter into one ideograph), but that yields isolated ideographs inside Latin words.
    """
    non_ascii = [c for c in text if ord(c) > 127]
    if not non_ascii or any(not _CJK.match(c) for c in non_ascii):
        return False
    ideographs = sum(1 for c in non_ascii if "\u3400" <= c <= "\u9fff")
    in_runs = sum(len(run) for run in _CJK_RUN.findall(text))
    return ideographs > 0 and 2 * in_runs >= ideographs


def is_html_fragment(text: str) -> bool:
    """True for the HTML page fragments some memotion cells hold instead of a caption."""
    return bool(_HTML_FRAGMENT.search(text))


def decode_document(raw: bytes) -> tuple[str, Counter]:
    """Decode a whole label file; lines that are not UTF-8 are decoded one by one (counted per encoding).

    Line by line because real files mix encodings; b"\\n" never occurs inside a multi-byte character of
    UTF-8, GB18030 or cp1252, so splitting on it is safe.
    """
    try:
        return raw.decode("utf-8-sig"), Counter()
    except UnicodeDecodeError:
        pass
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text, encoding = decode_text(raw)
        return text, Counter({encoding: 1})
    lines, used = [], Counter()
    for line in raw.removeprefix(codecs.BOM_UTF8).split(b"\n"):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            text, encoding = decode_text(line)
            used[encoding] += 1
            lines.append(line.decode(encoding) if encoding != "utf-16" else text)
    return "\n".join(lines), used


def read_label_text(path: Path) -> tuple[str, Counter]:
    """A label file's decoded text; LabelFileError for an empty or binary (NUL bytes) file."""
    try:
        raw = path.read_bytes()
    except OSError as error:  # missing, a folder, unreadable
        raise LabelFileError(f"{path}: cannot read it ({error.strerror or type(error).__name__})") from None
    if not raw.strip():
        raise LabelFileError(f"{path}: line 1: empty file")
    if b"\x00" in raw and not raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise LabelFileError(f"{path}: line {line}: binary data (NUL byte), not a text label file")
    text, fallbacks = decode_document(raw)
    if not text.strip():  # nothing but a byte-order mark
        raise LabelFileError(f"{path}: line 1: empty file")
    return text, fallbacks


@dataclass
class CsvTable:
    path: Path
    columns: list[str]  # header names, stripped and lower-cased
    rows: list[tuple[int, dict[str, str]]]  # (line number where the record starts, column -> cell)
    fallbacks: Counter  # non-UTF-8 encodings used, per line

    def error(self, line: int, what: str) -> LabelFileError:
        return LabelFileError(f"{self.path}: line {line}: {what}")


def read_csv(path: Path, required: tuple[str, ...]) -> CsvTable:
    """Read a label CSV (header + rows of the same width); LabelFileError names the file and line."""
    text, fallbacks = read_label_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    records = _records(path, reader)
    if not records:
        raise LabelFileError(f"{path}: line 1: empty file")
    header_line, header = records[0]
    columns = [name.strip().lower() for name in header]
    missing = [name for name in required if name not in columns]
    if missing:
        raise LabelFileError(
            f"{path}: line {header_line}: missing column(s) {', '.join(missing)} "
            f"(header has {len(columns)} column(s): {','.join(header)[:120]!r}; comma-separated expected)"
        )
    table = CsvTable(path, columns, [], fallbacks)
    for line, cells in records[1:]:
        if len(cells) != len(columns):
            raise table.error(line, f"expected {len(columns)} fields like the header, found {len(cells)}")
        table.rows.append((line, dict(zip(columns, cells))))
    return table


def _records(path: Path, reader) -> list[tuple[int, list[str]]]:
    """(start line, cells) of each non-blank record; csv errors become LabelFileError."""
    records = []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return records
        except csv.Error as err:
            raise LabelFileError(f"{path}: line {start}: malformed CSV ({err})") from None
        if any(cell.strip() for cell in cells):
            records.append((start, cells))
