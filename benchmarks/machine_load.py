"""What else the machine did during a benchmark: these machines are shared, so every benchmark reports it."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path


class OtherLoad:
    """CPU seconds used on the machine by everything but this process tree, over the run (other developers)."""

    def __init__(self):
        self.started, self.busy, self.ours = time.perf_counter(), self._busy(), self._ours()

    @staticmethod
    def _busy() -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait

    @staticmethod
    def _ours() -> float:
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    def cores(self) -> float:
        others = (self._busy() - self.busy) - (self._ours() - self.ours)
        return max(0.0, others / (time.perf_counter() - self.started))

