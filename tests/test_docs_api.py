"""docs/api.md runs: its python blocks, in order, in one namespace, in a temporary folder, on a tiny MVSA-Single copy
and the tiny encoders. The block after the settings marker names the reader's own data and models; once it has run,
its variables are replaced by the tiny ones."""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataset_writers import write_mvsa

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SETTINGS_MARKER = "<!-- docs-test: settings"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    code: str
    line: int  # of the block's first code line in the markdown file
    settings: bool  # the block right after the settings marker


def python_blocks(markdown: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(markdown):
        before = markdown[:match.start()].rstrip("\n")
        blocks.append(Block(code=match.group(1), line=markdown.count("\n", 0, match.start(1)) + 1,
                            settings=before.splitlines()[-1].startswith(SETTINGS_MARKER) if before else False))
    return blocks


def run_blocks(blocks: list[Block], namespace: dict, overrides: dict, source: str = "docs/api.md") -> None:
    """exec each block in `namespace`; after the settings block, `overrides` replace what it set. A failing block
    fails the test with its line in the markdown file and the traceback."""
    for number, block in enumerate(blocks, 1):
        # Blank lines first, so a traceback's line numbers are the markdown file's.
        code = compile("\n" * (block.line - 1) + block.code, source, "exec")
        failure = None
        try:
            exec(code, namespace)
        except Exception:
            failure = traceback.format_exc()
        if failure:  # outside the except clause, so the report is the block's traceback alone
            pytest.fail(f"{source}: python block {number} of {len(blocks)} (line {block.line}) failed:\n{failure}",
                        pytrace=False)
        if block.settings:
            namespace.update(overrides)


def test_every_python_block_of_the_api_page_runs(tiny_models, tmp_path, monkeypatch, one_thread):
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 8, f"{DOC}: expected the walk-through's python blocks, found {len(blocks)}"
    settings = [block for block in blocks if block.settings]
    assert len(settings) == 1 and settings[0] is blocks[0], \
        f"{DOC}: the first python block must follow the marker {SETTINGS_MARKER!r} (and only it)"
    for name in ("DATA", "TEXT_MODEL", "IMAGE_MODEL"):
        assert re.search(rf"^{name} = ", settings[0].code, re.MULTILINE), f"{DOC}: the settings block lacks {name}"

    text_model, image_model = tiny_models
    data = write_mvsa(tmp_path / "data", kind="single", n_per_class=8, dirty=False).root
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace = {"__name__": "docs_api"}
    run_blocks(blocks, namespace, {"DATA": str(data), "TEXT_MODEL": str(text_model), "IMAGE_MODEL": str(image_model)})

    # What the page says it leaves behind.
    assert (work / "caches" / "mvsa-single.h5").is_file()
    assert (work / "runs" / "mvsa-single-grid" / "best" / "head.safetensors").is_file()
    assert (work / "runs" / "mvsa-single-grid" / "report.md").is_file()


def test_a_failing_block_fails_with_its_line():
    markdown = ("text\n\n" + SETTINGS_MARKER + " -->\n```python\nDATA = 'mine'\n```\n\n```python\n"
                "assert DATA == 'tiny'\nx = 1\ny = undefined_name\n```\n")
    blocks = python_blocks(markdown)
    assert [block.settings for block in blocks] == [True, False]
    namespace: dict = {}
    with pytest.raises(pytest.fail.Exception) as failure:
        run_blocks(blocks, namespace, {"DATA": "tiny"}, source="example.md")
    assert "python block 2 of 2 (line 9)" in str(failure.value)
    assert 'File "example.md", line 11' in str(failure.value) and "undefined_name" in str(failure.value)
    assert namespace["x"] == 1
