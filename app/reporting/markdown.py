"""Markdown pieces every report writes: a table and a number."""

from __future__ import annotations

from typing import Any


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A pipe table's lines, and a blank line after it."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def number(value: Any, digits: int = 4) -> str:
    """A float to `digits` places, None as "-", anything else as it prints."""
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)
