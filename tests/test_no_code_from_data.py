"""Nothing runs code from data: no pickle loader anywhere in the package, model code from the hub only when the
user passes --trust-remote-code, a pickled model file that would run code is refused (not run), and a batch file
holding Python objects is never unpickled. Each "would run code" payload here touches a marker file, so a test
fails if the payload ever runs."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_fixtures import synthetic_plan, synthetic_rows, write_batches
from dataset_writers import write_mvsa
from fault_helpers import FIGURES, print_figures

from fusion.cache.partial import PartialCache, batch_name, partial_dir
from fusion.cache.reader import read_cache
from fusion.cache.writer import finalize
from fusion.cli import main
from fusion.errors import CacheError, ModelLoadError
from fusion.extract import encoders

PACKAGE = Path(__file__).resolve().parents[1]  # the repository root is the package `fusion`


def package_folders(root: Path = PACKAGE) -> list[Path]:
    """Every folder of the package: the root and each folder below it that holds an __init__.py and whose parents
    do too (tests/ and the virtual environment are not part of the package)."""
    folders, pending = [], [root]
    while pending:
        folder = pending.pop()
        folders.append(folder)
        pending += [child for child in sorted(folder.iterdir())
                    if child.is_dir() and (child / "__init__.py").is_file() and child.name != "tests"]
    return sorted(folders)


@pytest.fixture(scope="module", autouse=True)
def figures():
    start = FIGURES.copy()
    yield
    print_figures(__name__, start)


# ---------------------------------------------------------------- the source itself

FORBIDDEN_CALLS = {  # (object name, function) -> why
    ("torch", "load"): "torch.load unpickles; weights are safetensors",
    ("torch.jit", "load"): "TorchScript archives carry code",
    ("pickle", "load"): "pickle runs code", ("pickle", "loads"): "pickle runs code",
    ("pickle", "Unpickler"): "pickle runs code", ("dill", "load"): "dill runs code",
    ("joblib", "load"): "joblib unpickles", ("marshal", "loads"): "marshal loads code objects",
    ("shelve", "open"): "shelve unpickles", ("yaml", "load"): "yaml.load builds objects (use safe_load)",
    ("yaml", "unsafe_load"): "builds objects", ("pd", "read_pickle"): "unpickles",
    ("pandas", "read_pickle"): "unpickles",
}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def code_from_data_problems(source: str, filename: str) -> list[str]:
    """Every call in `source` that can run code from a file, or that enables remote code."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        owner, _, function = name.rpartition(".")
        where = f"{filename}:{node.lineno}"
        keywords = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        if (owner, function) in FORBIDDEN_CALLS:
            problems.append(f"{where}: {name}() - {FORBIDDEN_CALLS[owner, function]}")
        if name in ("eval", "exec", "compile", "__import__"):
            problems.append(f"{where}: {name}() runs text as code")
        if function == "load" and owner in ("np", "numpy"):
            allow = keywords.get("allow_pickle")
            if not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{where}: {name}() without allow_pickle=False")
        remote = keywords.get("trust_remote_code")
        if isinstance(remote, ast.Constant) and remote.value is True:
            problems.append(f"{where}: trust_remote_code=True")
        if function == "from_pretrained" and "trust_remote_code" not in keywords:
            problems.append(f"{where}: from_pretrained() without an explicit trust_remote_code")
    return problems


def test_the_checker_finds_each_kind_of_problem():
    bad = ("import torch, pickle, numpy as np\nw = torch.load('w.pt')\nx = pickle.loads(b'')\nnp.load('a.npz')\n"
           "np.load('b.npy', allow_pickle=True)\neval('1')\nM.from_pretrained('m', trust_remote_code=True)\n"
           "M.from_pretrained('m')\nnp.load('ok.npz', allow_pickle=False)\n")
    found = code_from_data_problems(bad, "bad.py")
    assert [line.split(":")[1] for line in found] == ["2", "3", "4", "5", "6", "7", "8"], found


def test_no_module_of_the_package_loads_pickles_or_runs_code():
    folders = package_folders()
    modules = sorted(path for folder in folders for path in folder.glob("*.py"))
    every_init = {path.parent for path in PACKAGE.rglob("__init__.py")
                  if not ({".venv", "tests", "build"} & set(path.relative_to(PACKAGE).parts))}
    assert every_init <= set(folders)  # no package folder is left out, however deep
    for module in ("cache/partial.py", "app/serve/server.py", "app/reporting/stats.py", "benchmarks/gpu_check.py",
                   "heads/search/grid.py", "extract/datasets/hfdata.py"):
        assert PACKAGE / module in modules, module
    problems = [problem for path in modules
                for problem in code_from_data_problems(path.read_text(encoding="utf-8"),
                                                       str(path.relative_to(PACKAGE)))]
    assert problems == []
    FIGURES["modules scanned for code-from-data calls"] += len(modules)


# ---------------------------------------------------------------- trust_remote_code


class Recorder:
    """Stands in for AutoModel & co.: records the keyword arguments, then loads for real."""

    def __init__(self, real, calls: list):
        self.real, self.calls = real, calls

    def from_pretrained(self, *args, **kwargs):
        self.calls.append((self.real.__name__, kwargs.get("trust_remote_code", "absent")))
        return self.real.from_pretrained(*args, **kwargs)


@pytest.fixture
def recorded(monkeypatch):
    calls: list = []
    for name in ("AutoModel", "AutoTokenizer", "AutoImageProcessor"):
        monkeypatch.setattr(encoders, name, Recorder(getattr(encoders, name), calls))
    return calls


def test_encoders_never_trust_remote_code_by_default(recorded, tiny_models):
    bert, dinov2 = tiny_models
    encoders.load_encoders(str(bert), str(dinov2), device="cpu")
    assert {name for name, _ in recorded} == {"AutoModel", "AutoTokenizer", "AutoImageProcessor"}
    assert {trust for _, trust in recorded} == {False}


@pytest.mark.parametrize("flag, expected", [([], False), (["--trust-remote-code"], True)])
def test_only_the_flag_turns_remote_code_on(recorded, tiny_models, tmp_path, flag, expected):
    bert, dinov2 = tiny_models
    data = write_mvsa(tmp_path / "data", kind="single", n_per_class=1, dirty=False, n_conflict=0)
    code = main(["extract", "--dataset", "mvsa-single", "--root", str(data.root), "--out", str(tmp_path / "c.h5"),
                 "--text-model", str(bert), "--image-model", str(dinov2), "--device", "cpu", "--workers", "0",
                 *flag])
    assert code == 0 and len(recorded) == 4 and {trust for _, trust in recorded} == {expected}


# ---------------------------------------------------------------- pickles planted in data


class WouldRunCode:
    """Unpickling this touches the marker file: the proof that a loader ran code from data."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_model_file_that_would_run_code_is_refused_in_one_line(tiny_models, tmp_path, capsys):
    bert, dinov2 = tiny_models
    evil, marker = tmp_path / "evil-bert", tmp_path / "code-ran"
    shutil.copytree(bert, evil)
    (evil / "model.safetensors").unlink()  # only the pickle is left, as in older hub repositories
    torch.save({"embeddings.word_embeddings.weight": WouldRunCode(marker)}, evil / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="could run code, so they were not loaded") as error:
        encoders.load_encoders(str(evil), str(dinov2), device="cpu")
    assert "\n" not in str(error.value) and not marker.exists()
    data = write_mvsa(tmp_path / "data", kind="single", n_per_class=1, dirty=False, n_conflict=0)
    code = main(["extract", "--dataset", "mvsa-single", "--root", str(data.root), "--out", str(tmp_path / "c.h5"),
                 "--text-model", str(evil), "--image-model", str(dinov2), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "could run code" in err and not marker.exists()
    FIGURES["pickles planted, none run"] += 2


@pytest.mark.parametrize("member", ["text", "index", "skipped_reason"])
def test_a_batch_file_holding_python_objects_is_never_unpickled(tmp_path, member):
    """np.savez pickles object arrays; such a file in the work folder is dropped and its rows recomputed."""
    out, marker = tmp_path / "c.h5", tmp_path / "code-ran"
    plan = synthetic_plan((6, 3, 3))
    rows = synthetic_rows(plan)
    PartialCache.open(out, plan=plan).close()
    arrays = {"index": np.arange(3, dtype=np.int64), "text": rows["text"][:3], "image": rows["image"][:3],
              "skipped_index": np.zeros(0, np.int64), "skipped_reason": np.zeros(0, dtype="<U1")}
    arrays[member] = np.array([WouldRunCode(marker)] * 3, dtype=object)
    planted = partial_dir(out) / batch_name(0, 0)
    with planted.open("wb") as handle:
        np.savez(handle, **arrays)
    with PartialCache.open(out, plan=plan) as partial:
        assert not planted.exists() and len(partial.pending()) == len(plan.ids)  # not trusted, rows to redo
        write_batches(partial, rows, partial.pending())
    finalize([partial_dir(out)], out)
    assert read_cache(out).splits["train"].text.dtype == np.float16 and not marker.exists()
    FIGURES["pickles planted, none run"] += 1


def test_finalize_refuses_an_object_array_planted_after_the_writer_finished(tmp_path):
    out, marker = tmp_path / "c.h5", tmp_path / "code-ran"
    plan = synthetic_plan((6, 3, 3))
    rows = synthetic_rows(plan)
    with PartialCache.open(out, plan=plan) as partial:
        write_batches(partial, rows, partial.pending(), batch_size=4)
    victim = sorted(partial_dir(out).glob("batch-*.npz"))[0]
    with np.load(victim, allow_pickle=False) as npz:
        arrays = dict(npz)
    arrays["image"] = np.array([WouldRunCode(marker)] * len(arrays["index"]), dtype=object)
    with victim.open("wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(CacheError, match="damaged batch file"):
        finalize([partial_dir(out)], out)
    assert not out.exists() and not marker.exists() and victim.exists()
    FIGURES["pickles planted, none run"] += 1
