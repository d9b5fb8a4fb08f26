"""Run directories: config.json, metrics.json and head.safetensors, written atomically and verified when loaded,
and test_predictions.json (the test rows' ids, labels and predictions, for the report's bootstrap intervals).

config.json holds the FitConfig fields (asdict) at its top level plus META_KEYS: where the features came from (cache
path and fingerprint, and the cache's description under "cache", e.g. its models and max_length for prediction), the
feature dimensions, the fusion version and the sha256 of head.safetensors, which load_run checks, so an altered
weights file is refused. Weights are safetensors only: loading never unpickles anything.

The optional key "tokens" says whether the head was trained on the cache's token sequences (`fusion fit --tokens`),
so prediction feeds it the same inputs; the cache's own "tokens" attribute only says the cache has them. Runs
written before the key existed have none and were trained on pooled vectors.

"temperature" is the head's temperature fitted on validation (heads/posthoc/calibration.py); metrics.json's
"calibration" block says how it was fitted and what it did to the validation NLL and the test ECE. A run without
one (written before temperatures were fitted) is "uncalibrated": its probabilities are the head's own.
train_means.safetensors holds the training split's mean pooled embeddings ("text", "image"), which explanations put
in place of a modality; config.json records its sha256 ("train_means_sha256", null for runs written before it).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fusion.version import __version__
from fusion.atomic import write_bytes_atomic
from fusion.errors import RunError
from fusion.heads.config import ConfigError, FitConfig, config_from_dict
from fusion.heads.models import Head, build_head, param_shapes
from fusion.heads.registry import HEADS
from fusion.heads.result import FitResult

CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE = "config.json", "metrics.json", "head.safetensors"
MEANS_FILE = "train_means.safetensors"
PREDICTIONS_FILE = "test_predictions.json"  # ids, y_true, y_pred (and raw logits) of the test rows: for report.md
META_KEYS = ("cache_path", "cache_fingerprint", "cache", "text_dim", "image_dim", "fusion_version", "head_sha256")
# key -> the value of a run written before the key existed (a null temperature: uncalibrated)
OPTIONAL_KEYS = {"tokens": False, "temperature": None, "train_means_sha256": None}


@dataclass
class LoadedRun:
    head: Head  # in eval mode
    config: FitConfig
    metrics: dict
    meta: dict  # the META_KEYS and OPTIONAL_KEYS values
    train_means: dict[str, torch.Tensor] | None = None  # "text", "image"; None for a run written before them

    @property
    def temperature(self) -> float | None:
        """The temperature fitted on validation; None: the run is uncalibrated (written before temperatures)."""
        return self.meta["temperature"]

    @property
    def cache(self) -> dict:
        """The description of the cache the head was trained on (models, max_length, ...); {} when none was given."""
        return self.meta["cache"]

    @property
    def tokens(self) -> bool:
        """True when the head was trained on token sequences, not only on pooled vectors."""
        return self.meta["tokens"]


def save_run(out_dir: Path | str, result: FitResult, *, cache_path: Path | str | None = None,
             fingerprint: str | None = None, dims: tuple[int, int] | None = None, cache: dict | None = None,
             tokens: bool = False) -> Path:
    """Write a run directory for `result`; returns the directory.

    cache: the cache's description (fusion.heads.runs.cache_meta: dataset, models, "path", "fingerprint", ...),
    stored whole; cache_path, fingerprint and dims (text_dim, image_dim) default to its values, and dims otherwise
    to the projection weights' input sizes (0 for the modality an ablation does not use).
    tokens: the features were token sequences (fit --tokens), which prediction must then rebuild.
    The weights go first and config.json (which records their sha256) last, so a directory with a config.json is
    complete; each file is replaced atomically.
    """
    cache = dict(cache or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = save_safetensors({name: tensor.detach().cpu().contiguous() for name, tensor in result.state_dict.items()})
    write_bytes_atomic(out / WEIGHTS_FILE, weights)
    means_sha256 = None
    if result.train_means is not None:
        means = save_safetensors({name: tensor.detach().cpu().float().contiguous()
                                  for name, tensor in result.train_means.items()})
        write_bytes_atomic(out / MEANS_FILE, means)
        means_sha256 = hashlib.sha256(means).hexdigest()
    metrics = {"val": result.val, "test": result.test, "best_epoch": result.best_epoch,
               "epochs_run": result.epochs_run, "seconds": result.seconds, "history": result.history,
               "calibration": result.calibration}
    write_bytes_atomic(out / METRICS_FILE, _json_bytes(metrics))
    if result.test_predictions is not None:
        predictions = json.dumps(result.test_predictions.as_dict(), separators=(",", ":")) + "\n"
        write_bytes_atomic(out / PREDICTIONS_FILE, predictions.encode())
    cache_path = cache_path if cache_path is not None else cache.get("path")
    text_dim, image_dim = dims if dims is not None else _dims(result, cache)
    config = {**asdict(result.config), "cache_path": None if cache_path is None else str(cache_path),
              "cache_fingerprint": fingerprint if fingerprint is not None else cache.get("fingerprint"),
              "cache": cache, "text_dim": int(text_dim), "image_dim": int(image_dim), "tokens": bool(tokens),
              "temperature": None if result.calibration is None else result.calibration["temperature"],
              "fusion_version": __version__, "head_sha256": hashlib.sha256(weights).hexdigest(),
              "train_means_sha256": means_sha256}
    write_bytes_atomic(out / CONFIG_FILE, _json_bytes(config))
    return out


def _dims(result: FitResult, cache: dict) -> tuple[int, int]:
    found = []
    for modality in ("text", "image"):
        weight = result.state_dict.get(f"{modality}_proj.weight")
        found.append(int(weight.shape[1]) if weight is not None else int(cache.get(f"{modality}_dim") or 0))
    return found[0], found[1]


def load_run(run_dir: Path | str) -> LoadedRun:
    """The run's head (eval mode), config, metrics and meta; any missing, damaged or altered file -> RunError."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"{run}: not a run directory")
    values = read_json(run / CONFIG_FILE)
    config, meta = _parse_config(run / CONFIG_FILE, values)
    metrics = read_json(run / METRICS_FILE)
    if not isinstance(metrics.get("val"), dict):
        raise RunError(f"{run / METRICS_FILE}: has no 'val' block")
    state = _read_weights(run / WEIGHTS_FILE, meta["head_sha256"])
    _check_tensors(run / WEIGHTS_FILE, state, config, meta)
    head = build_head(config, meta["text_dim"], meta["image_dim"], params=state)
    means = None
    if meta["train_means_sha256"] is not None:
        means = _read_weights(run / MEANS_FILE, meta["train_means_sha256"])
        _check_means(run / MEANS_FILE, means, meta)
    return LoadedRun(head.eval(), config, metrics, meta, means)


def _json_bytes(values: dict) -> bytes:
    return (json.dumps(_finite(values), indent=2, allow_nan=False) + "\n").encode()


def _finite(value):
    """A diverged run's NaN/inf losses become null: JSON has no NaN, and the file must stay readable everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def read_json(path: Path) -> dict:
    """A run's JSON file as a dict; missing, unreadable or not an object -> RunError naming the file."""
    if not path.is_file():
        raise RunError(f"{path}: missing")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise RunError(f"{path}: expected a JSON object, found {type(values).__name__}")
    return values


def _parse_config(path: Path, values: dict) -> tuple[FitConfig, dict]:
    names = {field.name for field in fields(FitConfig)}
    unknown = sorted(set(values) - names - set(META_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise RunError(f"{path}: unknown key(s) {', '.join(unknown)}")
    missing = sorted(set(META_KEYS) - set(values))
    if missing:
        raise RunError(f"{path}: missing key(s) {', '.join(missing)}")
    try:
        config = config_from_dict({key: value for key, value in values.items() if key in names})
    except (ConfigError, TypeError) as error:
        raise RunError(f"{path}: {error}") from None
    meta = {key: values[key] for key in META_KEYS} | {key: values.get(key, old) for key, old in OPTIONAL_KEYS.items()}
    if not isinstance(meta["tokens"], bool):
        raise RunError(f"{path}: tokens must be true or false, got {meta['tokens']!r}")
    temperature = meta["temperature"]
    if temperature is not None and (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
                                    or not math.isfinite(temperature) or temperature <= 0):
        raise RunError(f"{path}: temperature must be a positive number or null, got {temperature!r}")
    sha = meta["train_means_sha256"]
    if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise RunError(f"{path}: train_means_sha256 must be 64 lowercase hex digits or null, got {sha!r}")
    for key in ("text_dim", "image_dim"):  # 0: a modality the head does not use, of unknown size
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 0:
            raise RunError(f"{path}: {key} must be a non-negative integer, got {meta[key]!r}")
    if not isinstance(meta["cache"], dict):
        raise RunError(f"{path}: cache must be an object, got {meta['cache']!r}")
    if not isinstance(meta["head_sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", meta["head_sha256"]):
        raise RunError(f"{path}: head_sha256 must be 64 lowercase hex digits, got {meta['head_sha256']!r}")
    return config, meta


def _read_weights(path: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RunError(f"{path}: missing")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise RunError(f"{path}: altered or replaced (sha256 {actual[:16]}…, config.json records "
                       f"{expected_sha256[:16]}…)")
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise RunError(f"{path}: not a readable safetensors file ({error})") from None


def _check_tensors(path: Path, state: dict[str, torch.Tensor], config: FitConfig, meta: dict) -> None:
    shapes = param_shapes(HEADS[config.head], meta["text_dim"], meta["image_dim"], config.proj_dim, config.hidden)
    missing = sorted(set(shapes) - set(state))
    extra = sorted(set(state) - set(shapes))
    if missing or extra:
        raise RunError(f"{path}: tensors do not match head {config.head!r}"
                       + (f"; missing {', '.join(missing)}" if missing else "")
                       + (f"; unexpected {', '.join(extra)}" if extra else ""))
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape or state[name].dtype != torch.float32:
            raise RunError(f"{path}: tensor {name} is {tuple(state[name].shape)} {state[name].dtype}, "
                           f"expected {shape} torch.float32")


def _check_means(path: Path, means: dict[str, torch.Tensor], meta: dict) -> None:
    """A "text" and an "image" float32 vector, each as wide as the head's input when the run records it."""
    if set(means) != {"text", "image"}:
        raise RunError(f"{path}: expected the tensors text and image, found {', '.join(sorted(means)) or 'none'}")
    for name, tensor in means.items():
        width = meta[f"{name}_dim"]
        if tensor.dim() != 1 or tensor.dtype != torch.float32 or (width and tensor.shape[0] != width) \
                or not bool(torch.isfinite(tensor).all()):
            raise RunError(f"{path}: tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, expected "
                           f"({width or 'D'},) finite torch.float32")
