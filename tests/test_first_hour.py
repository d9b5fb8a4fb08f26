"""What a newcomer meets first: refusals that answer before torch loads, `--version`, a missing model named with the
download command and no retries, and a venv rebuilt when TORCH_SPEC changes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusion.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]

# Run the CLI in a fresh interpreter and say what it had imported when it returned.
PROBE = ("import sys; from fusion.cli import main; code = main(sys.argv[1:]); "
         "print(code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")


def _refusal(tmp_path: Path, *argv: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    return done.stdout.strip(), done.stderr.strip()


@pytest.mark.parametrize("argv, says", [
    (("fit", "--cache", "absent.h5"), "absent.h5: no such cache file"),
    (("grid", "--cache", "absent.h5"), "absent.h5: no such cache file"),
    (("fit", "--cache", "not-a-cache.h5", "--head", "self-attn"), "not an HDF5 file"),
    (("extract", "--dataset", "mvsa-single", "--root", "absent"), "absent: not found; expected an MVSA folder"),
    (("extract", "--dataset", "mvsa", "--root", "."), "unknown dataset 'mvsa'"),
    (("extract", "--dataset", "csv", "--root", "posts.csv", "--device", "gpu"), "unknown device 'gpu'"),
    (("extract", "--dataset", "csv", "--root", "posts.csv", "--precision", "fp8"), "unknown precision 'fp8'"),
    (("extract", "--dataset", "csv", "--root", "posts.csv", "--columns", "image=img"), "--columns applies to"),
    (("predict", "--run", "absent", "--image", "absent.jpg", "--text", "hi"), "--image absent.jpg: no such file"),
    (("predict", "--run", "absent", "--image", "posts.csv", "--text", "hi"), "absent: not a run directory"),
    (("predict", "--run", ".", "--csv", "absent.csv"), "absent.csv: cannot read it"),
    (("serve", "--run", "absent"), "absent: not a run directory"),
    (("report", "--run", "absent"), "absent: no such run or grid directory"),
    (("cache", "info", "absent.h5"), "absent.h5: no such cache file"),
    (("reproduce", "--data", "absent"), "absent: no such data folder"),
])
def test_a_bad_path_or_option_is_refused_in_one_line_before_torch_loads(tmp_path, argv, says):
    (tmp_path / "not-a-cache.h5").write_text("not HDF5")
    (tmp_path / "posts.csv").write_text("image,text,label\n")
    out, err = _refusal(tmp_path, *argv)
    assert out == "1 []", (out, err)
    assert err.startswith("fusion: error: ") and len(err.splitlines()) == 1 and says in err, err


def test_a_head_name_with_a_typo_is_answered_with_the_name_it_means(tmp_path):
    from cache_fixtures import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "c.h5", (6, 3, 3))
    out, err = _refusal(tmp_path, "fit", "--cache", str(cache), "--head", "self-attn")
    assert out == "1 []", (out, err)
    assert err == ("fusion: error: head 'self-attn' is not one of basic, self_attn, dual_attn, text_only, "
                   "image_only (did you mean self_attn?)")


def test_version():
    done = subprocess.run([sys.executable, "-m", "fusion.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    import fusion

    assert done.returncode == 0 and done.stdout.strip() == f"fusion {fusion.__version__}"


def test_a_model_missing_offline_is_refused_after_one_look_naming_hf_download(monkeypatch):
    """Without HF_HUB_OFFLINE and without a network, the hub is tried once (a closed port here), never through
    huggingface_hub's retries: from_pretrained is called for the local cache only."""
    from transformers import AutoModel

    from fusion.extract import encoders

    calls = []

    def from_pretrained(source, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        raise OSError("not in the local cache")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(AutoModel, "from_pretrained", from_pretrained)
    encoders.hub_unreachable.cache_clear()
    try:
        with pytest.raises(ModelLoadError) as refused:
            encoders._from_pretrained(AutoModel, "some-org/some-model", "text model", False)
    finally:
        encoders.hub_unreachable.cache_clear()
    message = str(refused.value)
    assert calls == [True]  # the local cache only: no hub download, so no retries
    assert "`hf download some-org/some-model`" in message and "HF_HUB_OFFLINE=1" in message
    assert "127.0.0.1:9" in message and "\n" not in message


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_rebuilds_the_venv_when_torch_spec_changes(tmp_path):
    """make -n on a copy of the Makefile beside a built venv: the same TORCH_SPEC plans nothing, another plans a
    rebuild with it."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / ".torch-spec").write_text("torch==2.13.0\n")
    (tmp_path / ".venv").mkdir()
    built = tmp_path / ".venv" / ".built"
    built.touch()
    now = time.time()  # pyproject.toml and the spec written a minute before the venv was built
    for source in ("pyproject.toml", ".torch-spec"):
        os.utime(tmp_path / source, (now - 120, now - 120))
    os.utime(built, (now - 60, now - 60))

    def plan(spec: str) -> str:
        done = subprocess.run(["make", "-n", "venv", f"TORCH_SPEC={spec}"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "rm -rf .venv" not in plan("torch==2.13.0")
    rebuilt = plan("torch==2.5.1")
    assert "rm -rf .venv" in rebuilt and 'pip install -q "torch==2.5.1"' in rebuilt


def test_a_grid_run_again_says_nothing_was_left_to_train(tmp_path, capsys):
    from cache_fixtures import write_synthetic_cache

    from fusion.cli import main

    cache = write_synthetic_cache(tmp_path / "c.h5", (30, 9, 9))
    argv = ["grid", "--cache", str(cache), "--heads", "basic", "--lrs", "1e-2", "--dropouts", "0", "--losses", "ce",
            "--epochs", "1", "--out", str(tmp_path / "grid")]
    assert main(argv) == 0
    assert "already" not in capsys.readouterr().out
    assert main(argv) == 0
    assert "all 1 configurations were already in" in capsys.readouterr().out
