"""The import graph keeps the layers docs/design.md draws: import-linter checks the contracts in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_the_layer_contracts_hold():
    """cli -> app -> extract | heads -> cache -> ground floor, extract and heads independent, no sibling cycles.
    A failure prints each broken import chain above."""
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def _package_folders() -> list[Path]:
    return [ROOT] + sorted(path.parent for path in ROOT.rglob("__init__.py")
                           if not {"tests", ".venv", "build"} & set(path.relative_to(ROOT).parts))


def test_no_folder_of_the_package_holds_more_than_14_modules():
    crowded = {str(folder.relative_to(ROOT)) or ".": count for folder in _package_folders()
               if (count := len(list(folder.glob("*.py")))) > 14}
    assert not crowded, f"folders over 14 modules: {crowded}; group them into sub-packages by concern"


# Concepts that once had several owners which drifted apart; each is defined in exactly one module now.
ONE_OWNER = {
    r"def resolve_device\(": "device.py",
    r"def bf16_units\(": "device.py",
    r"^def autocast\(": "device.py",
    r"^(ENCODER_|HEAD_)?PRECISIONS = ": "device.py",
    r"^METRICS = ": "paper.py",
    r"^METRIC_(NAMES|TITLES) = ": "paper.py",
    r"^(DEFAULT_|PAPER_)?TEXT_MODEL = ": "paper.py",
    r"^(DEFAULT_|PAPER_)?IMAGE_MODEL = ": "paper.py",
    r"^(PAPER_)?LRS = ": "paper.py",
    r"^RESAMPLES\b.*= ": "app/reporting/stats.py",
    r"^(SPLIT_NAMES|SPLIT_ALIASES)\b.*= ": "labels.py",
    r"^NUMERIC_LABELS\b.*= ": "labels.py",
    r"def (_?table|_?markdown_table)\(header": "app/reporting/markdown.py",
    r"^DATASET_METRICS = |def (default|dataset)_metric\(": "paper.py",
}


def test_each_concept_has_one_owner():
    import re

    sources = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
               for folder in _package_folders() for path in folder.glob("*.py")}
    owners = {pattern: sorted(name for name, text in sources.items() if re.search(pattern, text, re.M))
              for pattern in ONE_OWNER}
    assert owners == {pattern: [owner] for pattern, owner in ONE_OWNER.items()}
