"""The CLI's front door: usage mistakes get click's short usage message and exit 2, never a traceback; fusion's own
errors stay one line with exit 1."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fusion.cli import main

USAGE_MISTAKES = {
    "unknown option": (["extract", "--dataset", "csv", "--root", "x.csv", "--bogus"], "No such option: --bogus"),
    "misspelt option": (["fit", "--cahce", "c.h5"], "Possible options: --cache"),
    "wrong type": (["fit", "--cache", "c.h5", "--lr", "abc"], "Invalid value for '--lr'"),
    "unknown command": (["nope"], "No such command 'nope'"),
    "missing value": (["fit", "--cache"], "Option '--cache' requires an argument"),
    "missing option": (["fit"], "Missing option '--cache'"),
}


@pytest.mark.parametrize("argv, message", USAGE_MISTAKES.values(), ids=USAGE_MISTAKES.keys())
def test_usage_mistakes_exit_2_with_a_short_message(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
    assert "Traceback" not in captured.err and len(captured.err.splitlines()) <= 5


def test_the_installed_command_prints_no_traceback_for_a_usage_mistake(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fusion.cli", "fit", "--lr", "abc", "--cache", "c.h5"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "Invalid value for '--lr'" in done.stderr


def test_a_wrong_root_is_the_only_line_printed(tmp_path, capsys):
    """The progress bar is drawn from the first report on, so it does not flash "0/?" before the error."""
    code = main(["extract", "--dataset", "mvsa-single", "--root", str(tmp_path / "absent"),
                 "--out", str(tmp_path / "c.h5")])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.strip().splitlines() == [f"fusion: error: {tmp_path / 'absent'}: not found; expected an MVSA "
                                                 "folder holding labelResultAll.txt and data/"]
