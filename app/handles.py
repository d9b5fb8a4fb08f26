"""What the Python API hands back: a cache, a run and a grid, each a handle on the files fusion wrote.

A handle reads its files when it is made and holds nothing the files do not say, so the API, the CLI and a
notebook that opens the same path see the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from fusion.cache.info import cache_info, verify_cache
from fusion.cache.reader import SplitArrays, read_cache
from fusion.errors import RunError
from fusion.heads.search.summary import Summary, summarise
from fusion.labels import LABELS
from fusion.paper import METRICS

CACHE_FIELDS = ("cache.dataset", "cache.text_model", "cache.image_model")


@dataclass(frozen=True)
class Cache:
    """An embeddings cache written by `fusion extract`. `extraction` is the summary of the run that just wrote it
    (None for a cache opened from disk)."""
    path: Path
    info: dict
    extraction: Any = None  # extract.pipeline.ExtractSummary

    @classmethod
    def open(cls, path: Path | str, extraction: Any = None) -> Cache:
        return cls(Path(path), cache_info(Path(path)), extraction)

    @property
    def dataset(self) -> str:
        return self.info["dataset"]

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @property
    def splits(self) -> dict[str, int]:
        """Split name -> rows."""
        return {name: split["count"] for name, split in self.info["splits"].items()}

    @property
    def text_dim(self) -> int:
        return self.info["dims"]["text"]

    @property
    def image_dim(self) -> int:
        return self.info["dims"]["image"]

    def verify(self) -> dict:
        """Reads every stored byte so HDF5 checks every chunk's checksum: {"datasets", "bytes", "damaged"}."""
        return verify_cache(self.path)

    def features(self, split: str) -> SplitArrays:
        """The split's arrays as stored: text (N, D_text) and image (N, D_image) float16, label (N,) 0..2, id (N,)."""
        if split not in self._data.splits:
            raise KeyError(f"{self.path}: no split {split!r}; it has {', '.join(self._data.splits)}")
        return self._data.splits[split]

    @cached_property
    def _data(self):
        return read_cache(self.path)


@dataclass(frozen=True)
class Run:
    """A run directory (config.json, metrics.json, head.safetensors), its JSON checked for every field a report
    draws. `notes` are what the run's maker had to say about it (e.g. dual_attn on pooled features)."""
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    notes: tuple[str, ...] = ()

    @property
    def history(self) -> list[dict]:
        """One entry per epoch: the validation metrics and losses."""
        return self.metrics["history"]

    @classmethod
    def read(cls, run_dir: Path | str, notes: tuple[str, ...] = ()) -> Run:
        from fusion.heads.checkpoint import CONFIG_FILE, METRICS_FILE, read_json  # torch: only when a run is read

        run_dir = require_run_dir(Path(run_dir))
        config_path, metrics_path = run_dir / CONFIG_FILE, run_dir / METRICS_FILE
        metrics = read_json(metrics_path)
        config = read_json(config_path)
        for dotted in ("head", *CACHE_FIELDS):
            json_field(config, dotted, config_path, "str")
        _check_block(metrics.get("val"), metrics_path, "val.")
        _check_block(metrics.get("test"), metrics_path, "test.", confusion=True)
        json_field(metrics, "best_epoch", metrics_path)
        for index, entry in enumerate(json_field(metrics, "history", metrics_path, "list")):
            for dotted in ("epoch", *(f"per_class_f1.{name}" for name in LABELS)):
                json_field(entry, dotted, metrics_path, where=f"history[{index}].")
        return cls(run_dir, config, metrics, notes)


@dataclass(frozen=True)
class GridResult:
    """A grid directory: every configuration's row (results.json) and the chosen configuration retrained (best/)."""
    path: Path
    rows: list[dict]
    metric: str
    best: Run
    notes: tuple[str, ...] = field(default=())

    @property
    def summaries(self) -> list[Summary]:
        """Configurations over their seeds, best validation mean first."""
        return summarise(self.rows, self.metric)


def require_run_dir(path: Path) -> Path:
    """A run directory (what fit writes, or a grid's best/), else one line saying what it is not."""
    if not (path / "config.json").is_file():
        raise RunError(f"{path}: not a run directory (it has no config.json; `fusion fit` or `fusion grid` write one)")
    return path


def json_field(data: Any, dotted: str, path: Path, kind: str = "number", where: str = "") -> Any:
    """data['a']['b'] for 'a.b', checked to be a number/str/non-empty list; else RunError naming file and field."""
    value = data
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    ok = {"number": isinstance(value, (int, float)) and not isinstance(value, bool), "str": isinstance(value, str),
          "list": isinstance(value, list) and len(value) > 0}[kind]
    if not ok:
        raise RunError(f"{path}: '{where}{dotted}' missing or not a {'non-empty list' if kind == 'list' else kind}")
    return value


def _check_block(block: Any, path: Path, where: str, *, confusion: bool = False) -> None:
    for name in METRICS:
        json_field(block, name, path, where=where)
    for name in LABELS:
        json_field(block, f"per_class_f1.{name}", path, where=where)
    if confusion:
        matrix = json_field(block, "confusion_matrix", path, "list", where)
        if len(matrix) != 3 or any(not isinstance(r, list) or len(r) != 3 for r in matrix) or not all(
                isinstance(v, (int, float)) for r in matrix for v in r):
            raise RunError(f"{path}: '{where}confusion_matrix' is not a 3x3 list of counts")
