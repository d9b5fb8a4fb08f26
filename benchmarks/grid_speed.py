"""The paper's 144-configuration grid at MVSA-Multi size: ours (stacked passes, --prune) against the plain loop, and
whether --prune chooses what the exhaustive grid chooses; measured in one run.

    .venv/bin/python -m fusion.benchmarks.grid_speed [--threads 2] [--plain-sample 2] [--check-size mvsa-single]

Features: common.py signal_features (a learnable signal in both modalities, so "best" means something), 768-d text
and 384-d image, MVSA-Multi's 13,624 / 1,700 / 1,700 rows, in memory.
- ours: `run_grid` over the paper's grid (3 heads x 4 lrs x 3 dropouts x 4 losses) with --prune, in bf16 on a GPU
  (--device cuda) or where the CPU has bf16 units (AMX or avx512_bf16), else fp32; the default FitConfig otherwise
  (batch size, at most 30 epochs, patience 5, macro F1); timed end to end.
- plain: the paper's protocol run plainly, one configuration at a time, exhaustive (fit_speed.PlainRun: nn.Linear
  modules, torch.optim.Adam, index_select minibatches at the same batch size and precision, the same early
  stopping). --plain-sample configurations per head, drawn at random (seed 0), each run COMPLETELY and timed; each
  head's 48 configurations are charged the mean of its sample.
- pruned_same_best: the exhaustive and the pruned grid (ours, same precision) on features of --check-size drawn
  the same way (other rows); whether both choose the same configuration, and epochs_saved = 1 - pruned epochs /
  exhaustive epochs there. The check may run at MVSA-Single size to fit the time: the size is printed.
- limit: each side's matrix-product FLOPs (fit_speed.epoch_flops for every configuration-epoch it trained, its own
  way of writing the head; the plain side over its sampled runs) against the peak GEMM rate of the precision on the
  device (common.py gemm_rate, at the start and after each timed part): "of limit" is the fraction reached.
The last line is one JSON object.
"""

from __future__ import annotations

import os
import random
import statistics
import time

import torch

from fusion.benchmarks.common import (MVSA_MULTI, OtherLoad, add_device, add_threads, config_name, finish,
                                      gemm_rate, new_parser, signal_features, synchronize, timed_grid, use_threads)
from fusion.benchmarks.fit_speed import PlainRun, epoch_flops
from fusion.device import autocast, bf16_units, resolve_device
from fusion.heads.config import FitConfig
from fusion.heads.search.configs import grid_configs
from fusion.heads.search.prune import Pruning
from fusion.heads.search.summary import summarise
from fusion.paper import HEADS as PAPER_HEADS

CHECK_SIZES = {"mvsa-multi": MVSA_MULTI, "mvsa-single": {"train": 3_608, "val": 451, "test": 452}}


def plain_complete_run(features, config: FitConfig, device: torch.device) -> tuple[float, int]:
    """Seconds and epochs of one configuration trained plainly to its early stop (the trainer's rule)."""
    run, best, best_epoch, epoch = PlainRun(features, config, seed=config.seed, device=device), -1.0, 0, 0
    synchronize(device)
    start = time.perf_counter()
    with autocast(config.precision, device):
        while epoch < config.epochs and epoch - best_epoch < config.patience:
            epoch += 1
            score = run.epoch()[config.metric]
            if score > best:
                best, best_epoch = score, epoch
    synchronize(device)
    return time.perf_counter() - start, epoch


def plain_total(features, configs: list[FitConfig], sample: int, device: torch.device) -> tuple[float, dict, float]:
    """Seconds charged to the exhaustive plain grid, the sampled runs per head, and the sampled runs' FLOPs per
    second measured."""
    PlainRun(features, configs[0], device=device).epoch()  # warm-up: allocator, threads, kernels
    total, by_head, flops, seconds = 0.0, {}, 0, 0.0
    for head in PAPER_HEADS:
        mine = [c for c in configs if c.head == head]
        runs = [plain_complete_run(features, config, device) for config in random.Random(0).sample(mine, sample)]
        mean = statistics.fmean(run_seconds for run_seconds, _ in runs)
        flops += sum(epochs for _, epochs in runs) * trained_flops(features, head, "plain")
        seconds += sum(run_seconds for run_seconds, _ in runs)
        by_head[head] = {"runs": [(round(s, 1), e) for s, e in runs], "charged": round(mean * len(mine), 1)}
        print(f"plain {head}: sampled runs (seconds, epochs) {by_head[head]['runs']} -> {len(mine)} configurations "
              f"charged {mean * len(mine):.0f} s", flush=True)
        total += mean * len(mine)
    return total, by_head, flops / seconds


def trained_flops(features, head: str, written: str) -> int:
    """Matrix-product FLOPs of one configuration-epoch on these features."""
    return epoch_flops(head, len(features["train"]), len(features["val"]), written)


def pruned_same_best(size: str, precision: str, scale: float, device: torch.device) -> tuple[bool, float, str]:
    features = signal_features(scaled(CHECK_SIZES[size], scale), seed=1)
    configs = grid_configs(FitConfig(precision=precision))
    exhaustive, exhaustive_seconds = timed_grid(features, configs, device=device)
    pruned, pruned_seconds = timed_grid(features, configs, prune=Pruning(), device=device)
    chosen = [summarise(rows, "macro_f1")[0] for rows in (exhaustive, pruned)]
    epochs = [sum(row["epochs_run"] for row in rows) for rows in (exhaustive, pruned)]
    same = chosen[0].config == chosen[1].config
    print(f"check at {size} size {scaled(CHECK_SIZES[size], scale)}: exhaustive chooses "
          f"{config_name(chosen[0].config)} (val {chosen[0].val_mean:.4f}) in {epochs[0]} epochs, "
          f"{exhaustive_seconds:.0f} s; pruned chooses {config_name(chosen[1].config)} (val {chosen[1].val_mean:.4f}) "
          f"in {epochs[1]} epochs, {pruned_seconds:.0f} s", flush=True)
    return same, 1 - epochs[1] / epochs[0], size


def scaled(sizes: dict[str, int], scale: float) -> dict[str, int]:
    return {split: max(30, round(n * scale)) for split, n in sizes.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = new_parser(__doc__)
    add_threads(parser, 2)
    parser.add_argument("--plain-sample", type=int, default=2, help="complete plain runs timed per head")
    parser.add_argument("--check-size", choices=sorted(CHECK_SIZES), default="mvsa-single")
    parser.add_argument("--scale", type=float, default=1.0, help="rows x SCALE everywhere (a quick look; printed)")
    add_device(parser, "cpu", help="cpu, or cuda (benchmarks/gpu_check.sh)")
    args = parser.parse_args(argv)
    use_threads(args.threads)
    load = OtherLoad()
    device = resolve_device(args.device)
    units = bf16_units() if device.type == "cpu" else "gpu"
    precision = "fp32" if units == "none" else "bf16"
    sizes = scaled(MVSA_MULTI, args.scale)
    features = signal_features(sizes)
    configs = grid_configs(FitConfig(precision=precision))
    print(f"device {device}; threads {torch.get_num_threads()}; CPU bf16 units: {bf16_units()} -> {precision}; "
          f"{len(configs)} configurations "
          f"at {'MVSA-Multi size' if args.scale == 1 else f'{args.scale} x MVSA-Multi size'} {sizes}, batch "
          f"{configs[0].batch_size}, at most {configs[0].epochs} epochs; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    rates = [gemm_rate(dtype, device=device)]
    rows, seconds = timed_grid(features, configs, prune=Pruning(), device=device)
    pruned = sum(1 for row in rows if row["pruned_at"] is not None)
    print(f"ours (--prune, {precision}): {seconds:.0f} s; {sum(r['epochs_run'] for r in rows)} configuration-epochs; "
          f"{pruned} configurations pruned; chooses {config_name(summarise(rows, 'macro_f1')[0].config)}", flush=True)
    ours_rate = sum(r["epochs_run"] * trained_flops(features, r["config"]["head"], "stacked") for r in rows) / seconds
    rates.append(gemm_rate(dtype, device=device))
    plain_seconds, _, plain_rate = plain_total(features, configs, args.plain_sample, device)
    rates.append(gemm_rate(dtype, device=device))
    ours_of_limit, plain_of_limit = ours_rate / max(rates), plain_rate / max(rates)
    print(f"of limit (peak {precision} GEMM {max(rates) / 1e9:.1f} GFLOP/s, measured {len(rates)} times from "
          f"{min(rates) / 1e9:.1f}): ours {ours_of_limit:.1%}, plain {plain_of_limit:.1%}", flush=True)
    same, saved, size = pruned_same_best(args.check_size, precision, args.scale, device)
    others = load.cores()
    summary = {"configs": len(configs), "seconds": round(seconds, 1), "plain_seconds": round(plain_seconds),
               "speedup_vs_plain": round(plain_seconds / seconds, 1),
               "ours_of_limit": round(ours_of_limit, 3), "plain_of_limit": round(plain_of_limit, 3),
               "pruned_same_best": same,
               "epochs_saved": round(saved, 3), "check_size": size, "scale": args.scale, "precision": precision,
               "device": str(device), "bf16_units": bf16_units(),
               "threads": torch.get_num_threads(), "other_load_cores": round(others, 2)}
    return finish(summary, other_cores=others)


if __name__ == "__main__":
    main()
