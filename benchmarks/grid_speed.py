"""The paper's whole 144-configuration grid on an MVSA-Multi-sized cache, against the naive way, in one run.

    .venv/bin/python benchmarks/grid_speed.py [--threads 2] [--epochs 30] [--naive-sample 3]

Problem: 13,624 train / 1,700 val / 1,700 test rows, 768-d text and 384-d image features (random, in memory).
- ours: `run_grid` over the default grid (3 heads x 4 lrs x 3 dropouts x 4 losses), default FitConfig (early
  stopping on validation macro F1, at most --epochs epochs), timed end to end;
- naive: one configuration at a time, DataLoader(batch 32, shuffle) + nn.Module + torch.optim.Adam, validation scored
  each epoch (benchmarks/fit_speed.py's loop). Timing all 144 would take hours, so --naive-sample configurations
  per head are timed for one epoch each, and the naive total is extrapolated as seconds per epoch of each head times
  the epochs our grid actually ran for that head's configurations (the naive loop would stop at the same epochs).
Last line: {"configs": 144, "seconds": ..., "speedup_vs_naive": ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fit_speed import dataloader_seconds_per_epoch, synthetic_features  # noqa: E402

from fusion.heads.config import FitConfig  # noqa: E402
from fusion.heads.grid import PAPER_HEADS, grid_configs, run_grid  # noqa: E402


def naive_seconds_per_epoch(features: dict, head: str, sample: int) -> float:
    return statistics.fmean(dataloader_seconds_per_epoch(features, head, epochs=1) for _ in range(sample))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=FitConfig().epochs)
    parser.add_argument("--naive-sample", type=int, default=2, help="naive one-epoch runs timed per head")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    features = synthetic_features()
    configs = grid_configs(FitConfig(epochs=args.epochs))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        rows = run_grid(features, configs, Path(out))
        seconds = time.perf_counter() - start
    epochs_by_head = {head: sum(r["epochs_run"] for r in rows if r["config"]["head"] == head) for head in PAPER_HEADS}
    naive = {head: naive_seconds_per_epoch(features, head, args.naive_sample) for head in PAPER_HEADS}
    naive_total = sum(naive[head] * epochs_by_head[head] for head in PAPER_HEADS)
    print(f"threads {args.threads}; {len(configs)} configurations, at most {args.epochs} epochs each")
    for head in PAPER_HEADS:
        print(f"{head:<10} epochs run {epochs_by_head[head]:>5}  naive {naive[head]:.2f} s/epoch "
              f"-> {naive[head] * epochs_by_head[head]:8.0f} s")
    print(f"ours: {seconds:.1f} s for the whole grid; naive (extrapolated): {naive_total:.0f} s")
    summary = {"configs": len(configs), "seconds": round(seconds, 1),
               "speedup_vs_naive": round(naive_total / seconds, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
