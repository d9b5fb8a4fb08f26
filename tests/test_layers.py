"""The import graph keeps the layers README draws: import-linter checks the contracts in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_the_layer_contracts_hold():
    """cli -> app -> extract | heads -> cache -> ground floor, extract and heads independent, no sibling cycles.
    A failure prints each broken import chain above."""
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0
