"""README.md runs as written: every fenced shell and Python block, in order, in one folder, with the environment's
bin/ first on PATH, on what `make demo` leaves there (the newcomer's offline route), made small. A block whose first
line says `# needs: ...` (the hub, a real dataset) is skipped by name; so is the block of `make` commands, which
is what runs this suite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(sh|python)\n(.*?)^```", re.M | re.S)


def readme_blocks() -> list[tuple[int, str, str]]:
    """(line number, language, code) of README's runnable blocks, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(text[:match.start()].count("\n") + 1, match.group(1), match.group(2)) for match in FENCE.finditer(text)]


def _environment() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "FUSION_DEBUG": ""}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_models):
    """What `make demo` leaves that README's commands use: the demo's MVSA-format data, the posts it writes for
    predict and serve, and its random DINOv2 (a tiny one, where the demo writes it). The demo's own extraction and
    grid are tests/test_cli_runs.py's to run."""
    from fusion.app.demo import write_new_posts
    from fusion.extract.datasets.demo_data import write_demo_dataset

    folder = tmp_path_factory.mktemp("readme")
    write_demo_dataset(folder / "demo_out" / "data", n=60)
    write_new_posts(folder / "demo_out")
    shutil.copytree(tiny_models[1], folder / "demo_out" / "models" / "dinov2-random")
    return folder


@pytest.mark.parametrize("line, language, code", readme_blocks(),
                         ids=[f"line{line}" for line, _, _ in readme_blocks()])
def test_the_readme_block_runs_as_written(folder, line, language, code):
    first = code.splitlines()[0]
    if first.startswith("# needs:"):
        pytest.skip(f"README line {line} {first[2:]}")
    if first.startswith("make "):
        pytest.skip(f"README line {line}: `make demo` / `make test` build the environment this suite runs in")
    if language == "python":
        done = _run([str(BIN / "python"), "-c", code], folder)
    else:
        done = _run_shell(code, folder)
    assert done.returncode == 0, f"README line {line}:\n{code}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def _run(argv: list[str], folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=folder, env=_environment(), capture_output=True, text=True, timeout=900)


def _run_shell(code: str, folder: Path) -> subprocess.CompletedProcess:
    """The block as one bash script; a command sent to the background with `&` (a server) is started first and
    waited for on its port, the rest run against it, and it is stopped afterwards."""
    commands = code.replace("\\\n", " ").splitlines()
    background = [command for command in commands if re.search(r"&\s*(#.*)?$", command)]
    if not background:
        return _run(["bash", "-e", "-o", "pipefail", "-c", code], folder)
    [server] = background
    process = subprocess.Popen(["bash", "-c", f"exec {server.split('&')[0]}"], cwd=folder, env=_environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for("http://127.0.0.1:8000/health", process)
        rest = "\n".join(command for command in commands if command not in background)
        done = _run(["bash", "-e", "-o", "pipefail", "-c", rest], folder)
        answers = [line for line in done.stdout.splitlines() if line.strip()]
        assert answers and all('"label"' in answer and '"error"' not in answer for answer in answers), done.stdout
        return done
    finally:
        process.terminate()
        process.wait(timeout=60)


def _wait_for(url: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server stopped: {process.stderr.read()[-3000:]}"
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")
