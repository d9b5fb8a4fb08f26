"""The training configuration of one head: a frozen dataclass saved (asdict) with every result and checkpoint."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields

from fusion.device import HEAD_PRECISIONS
from fusion.errors import FusionError
from fusion.heads.registry import HEADS
from fusion.paper import METRICS

LOSSES = ("ce", "focal")
# Fields added after results were first saved, with the value every earlier result was trained with: a saved config
# without them still loads, and means what it meant.
ADDED_FIELDS = {"precision": "fp32"}


class ConfigError(FusionError, ValueError):
    """A FitConfig field has a wrong type or value (the message names the field)."""


@dataclass(frozen=True)
class FitConfig:
    head: str = "self_attn"
    lr: float = 1e-3
    dropout: float = 0.2
    loss: str = "focal"  # "ce" | "focal"; ce is focal with gamma 0 (alpha still applies when given)
    gamma: float = 2.0  # ignored when loss == "ce"
    alpha: tuple[float, float, float] | None = None  # per-class weights (negative, neutral, positive)
    # 256 rather than a DataLoader-style 32/64: one step costs a few fixed milliseconds of framework time on a CPU,
    # so small batches are overhead-bound (benchmarks/fit_speed.py measures it).
    batch_size: int = 256
    epochs: int = 30  # a maximum: early stopping usually ends a run sooner
    patience: int = 5
    metric: str = "macro_f1"
    seed: int = 0
    proj_dim: int = 256
    hidden: int = 256
    # bf16: products and activations in bf16, weights and Adam state in fp32 (device.py head_dtype). Part of the
    # config because it changes the numbers (a bf16 result is recorded and resumed as such); the device is not, it
    # only changes where they are computed.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for field in fields(self):
            _check_field(self, field.name)

    @property
    def loss_label(self) -> str:
        """The loss as the grid names it: "ce" or "focal" + gamma ("focal2")."""
        return loss_label(self.loss, self.gamma)

    @property
    def focal_gamma(self) -> float:
        """The gamma the loss uses: cross-entropy is focal loss with gamma 0."""
        return 0.0 if self.loss == "ce" else float(self.gamma)


def loss_label(loss: str, gamma: float) -> str:
    """"ce" or "focalGAMMA", for a config given as a FitConfig or as its saved dict."""
    return "ce" if loss == "ce" else f"focal{gamma:g}"


def config_from_dict(values: dict) -> FitConfig:
    """A FitConfig from JSON-like values (alpha as a list); unknown or missing keys are a ConfigError, except the
    ADDED_FIELDS, which take the value results saved before them were trained with."""
    names = {field.name for field in fields(FitConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    values = {**ADDED_FIELDS, **values}
    missing = sorted(names - set(values))
    if missing:
        raise ConfigError(f"missing config key(s): {', '.join(missing)}")
    return FitConfig(**values)


def _check_field(config: FitConfig, name: str) -> None:
    value = getattr(config, name)
    if name in _INTS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if name != "seed" and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    elif name in _FLOATS:
        _check_number(name, value)
        # Stored as float so that equal configs compare (and serialise) equal whether given 1 or 1.0.
        object.__setattr__(config, name, float(value))
        _check_range(name, float(value))
    elif name == "alpha":
        _check_alpha(config, value)
    elif not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    else:
        _check_choice(name, value)


_INTS = ("batch_size", "epochs", "patience", "seed", "proj_dim", "hidden")
_FLOATS = ("lr", "dropout", "gamma")


def _check_number(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _check_range(name: str, value: float) -> None:
    if name == "lr" and value <= 0:
        raise ConfigError(f"lr must be > 0, got {value}")
    if name == "dropout" and not 0 <= value < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {value}")
    if name == "gamma" and value < 0:
        raise ConfigError(f"gamma must be >= 0, got {value}")


def _check_alpha(config: FitConfig, value) -> None:
    if value is None:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ConfigError(f"alpha must be None or 3 numbers (negative, neutral, positive), got {value!r}")
    for weight in value:
        _check_number("alpha", weight)
        if weight <= 0:
            raise ConfigError(f"alpha weights must be > 0, got {value!r}")
    object.__setattr__(config, "alpha", tuple(float(weight) for weight in value))


def _check_choice(name: str, value: str) -> None:
    if name == "head":
        choices = tuple(HEADS)
    else:
        choices = {"loss": LOSSES, "metric": METRICS, "precision": HEAD_PRECISIONS}[name]
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(choices)}{hint}")
