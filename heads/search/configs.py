"""The grid's configurations: the paper's losses by name, the product of the settings, and the key that says two
configurations (or a logged row and a configuration) are the same run. Light: no torch, so a command checks its
grid before anything heavy loads."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Iterable

from fusion import paper
from fusion.errors import FusionError
from fusion.heads.config import FitConfig


def parse_loss(name: str) -> tuple[str, float]:
    """'ce' -> cross-entropy; 'focal2' or 'focal:2.5' -> focal loss with that gamma."""
    if name == "ce":
        return "ce", 0.0
    match = re.fullmatch(r"focal:?([0-9]*\.?[0-9]+)", name)
    if not match:
        raise FusionError(f"unknown loss {name!r}: use ce, or focal with a gamma such as focal2 or focal:2.5")
    return "focal", float(match.group(1))


def grid_configs(base: FitConfig, *, heads: Iterable[str] = paper.HEADS, lrs: Iterable[float] = paper.LRS,
                 dropouts: Iterable[float] = paper.DROPOUTS, losses: Iterable[str] = paper.LOSSES,
                 seeds: Iterable[int] = (0,)) -> list[FitConfig]:
    configs = []
    for head, lr, dropout, loss, seed in itertools.product(heads, lrs, dropouts, losses, seeds):
        kind, gamma = parse_loss(loss)
        configs.append(dataclasses.replace(base, head=head, lr=float(lr), dropout=float(dropout), loss=kind,
                                           gamma=gamma if kind == "focal" else base.gamma, seed=int(seed)))
    return configs


def config_key(config: FitConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_key_from_row(row: dict) -> str:
    return config_key(FitConfig(**{k: tuple(v) if k == "alpha" and v is not None else v
                                   for k, v in row["config"].items()}))
