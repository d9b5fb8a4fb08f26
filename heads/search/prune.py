"""Successive halving inside a vectorised pass (`fusion grid --prune`).

At each rung (epochs first_rung, first_rung*eta, first_rung*eta^2, ... below the longest model's epoch limit: 2, 6
and 18 for 30 epochs) the models of a pass that are still training are ranked by their best validation score so
far, and only the best ceil(n/eta) go on; the others stop there, their best weights and scores kept like an
early-stopped model's. A model that stops by itself (patience, its own epoch limit) before a rung takes no part in it.
Models are independent, so a survivor's run is exactly what it would have been in the exhaustive grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Pruning:
    eta: int = 3
    first_rung: int = 2

    def __post_init__(self) -> None:
        if self.eta < 2 or self.first_rung < 1:
            raise ValueError(f"pruning needs eta >= 2 and a first rung >= 1, got {self.eta}, {self.first_rung}")

    def rungs(self, max_epochs: int) -> list[int]:
        """The epochs at which a pass whose longest model runs `max_epochs` prunes."""
        rungs, epoch = [], self.first_rung
        while epoch < max_epochs:
            rungs.append(epoch)
            epoch *= self.eta
        return rungs

    def survivors(self, scores: list[float]) -> list[int]:
        """Positions of the best ceil(n/eta) scores (ties: the earlier position), in their original order."""
        count = math.ceil(len(scores) / self.eta)
        ranked = sorted(range(len(scores)), key=lambda position: (-scores[position], position))
        return sorted(ranked[:count])
