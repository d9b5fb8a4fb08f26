"""What the grid's options change in its answer, measured in one run: bf16 against fp32, `--prune` against the
exhaustive grid, and batch 32 against batch 256 (the paper gives no batch size).

    .venv/bin/python -m fusion.benchmarks.grid_choices --cache demo_out/demo.h5 [--parts bf16,prune,batch] [--seeds 3]

Data: the cache given (`make demo` writes demo_out/demo.h5) and a synthetic task (common.py signal_features: three
gaussian classes whose means lie in random directions of both modalities; 2,000 / 500 / 500 rows of 768-d text and
384-d image features).
- bf16: a 6-configuration grid (basic, self_attn, dual_attn x lr 1e-3, 1e-4; dropout 0.2, cross-entropy) x --seeds
  in fp32 and in bf16; the best validation metric of each (mean over seeds, as `grid --seeds` ranks), the seeds'
  spread of fp32's best for scale, and the largest difference of any one run's. A CPU without bf16 units emulates
  bf16 matmuls: slow, and the same rounding (bf16 inputs, fp32 sums) as the units.
- prune: the paper's 144 configurations exhaustive and with --prune, for each seed (the seed of initialisation,
  shuffling and dropout): the configuration each chooses, whether it is the same one, how much worse the pruned
  choice scored in the exhaustive grid (0 when the same), and the epochs each trained.
- batch: the paper's grid on the cache at batch 256 and at batch 32, over --batch-seeds seeds: the configuration
  chosen, its validation and test metric, the best validation metric reached at each learning rate, and how many
  runs never beat always predicting the majority class on validation.
Every grid uses the default FitConfig otherwise (at most 30 epochs, patience 5) and the dataset's metric.
The last line is one JSON object with the figures README quotes.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from fusion.benchmarks.common import (OtherLoad, add_threads, config_name, finish, new_parser, signal_features,
                                      timed_grid, use_threads)
from fusion.device import bf16_units
from fusion.heads.config import FitConfig
from fusion.heads.runs import load_features
from fusion.heads.search.configs import grid_configs
from fusion.heads.search.prune import Pruning
from fusion.heads.search.summary import summarise
from fusion.paper import HEADS as PAPER_HEADS, dataset_metric

SYNTHETIC_SIZES = {"train": 2_000, "val": 500, "test": 500}


def compare_bf16(name: str, features, metric: str, seeds: int) -> dict:
    base = FitConfig(metric=metric, loss="ce")
    fp32_configs = grid_configs(base, heads=PAPER_HEADS, lrs=(1e-3, 1e-4), dropouts=(0.2,), losses=("ce",),
                                seeds=range(seeds))
    fp32, fp32_seconds = timed_grid(features, fp32_configs)
    bf16, bf16_seconds = timed_grid(features, [dataclasses.replace(c, precision="bf16") for c in fp32_configs])
    best = {p: summarise(rows, metric)[0] for p, rows in (("fp32", fp32), ("bf16", bf16))}
    worst = max(abs(a["val"][metric] - b["val"][metric]) for a, b in zip(fp32, bf16))
    result = {"best_fp32": round(best["fp32"].val_mean, 4), "best_bf16": round(best["bf16"].val_mean, 4),
              "best_diff": round(abs(best["fp32"].val_mean - best["bf16"].val_mean), 4), "seeds": seeds,
              "fp32_seed_sd": round(best["fp32"].val_std, 4),
              "max_config_diff": round(worst, 4), "same_choice": config_name(best["fp32"].config) == config_name(
                  best["bf16"].config)}
    print(f"bf16 on {name} ({seeds} seeds): best val {metric} fp32 {result['best_fp32']:.4f} ± "
          f"{result['fp32_seed_sd']:.4f} ({config_name(best['fp32'].config)}), "
          f"bf16 {result['best_bf16']:.4f} ({config_name(best['bf16'].config)}); largest difference of one "
          f"run {worst:.4f}; {fp32_seconds:.0f} s fp32, {bf16_seconds:.0f} s bf16", flush=True)
    return result


def compare_prune(name: str, features, metric: str, seeds: int, batch_size: int) -> dict:
    outcomes = []
    for seed in range(seeds):
        configs = grid_configs(FitConfig(metric=metric, batch_size=batch_size), seeds=(seed,))
        exhaustive, exhaustive_seconds = timed_grid(features, configs)
        pruned, pruned_seconds = timed_grid(features, configs, prune=Pruning())
        full_best, pruned_best = summarise(exhaustive, metric)[0], summarise(pruned, metric)[0]
        by_choice = {config_name(row): row["val"][metric] for row in exhaustive}
        epochs = [sum(row["epochs_run"] for row in rows) for rows in (exhaustive, pruned)]
        outcome = {"seed": seed, "same": config_name(full_best.config) == config_name(pruned_best.config),
                   "gap": round(full_best.val_mean - by_choice[config_name(pruned_best.config)], 4),
                   "epochs": epochs, "seconds": [round(exhaustive_seconds, 1), round(pruned_seconds, 1)]}
        outcomes.append(outcome)
        print(f"prune on {name}, seed {seed}: exhaustive {config_name(full_best.config)} ({full_best.val_mean:.4f}), "
              f"pruned {config_name(pruned_best.config)} ({pruned_best.val_mean:.4f}); same: {outcome['same']}, "
              f"gap {outcome['gap']:.4f}; epochs {epochs[0]} -> {epochs[1]} "
              f"({1 - epochs[1] / epochs[0]:.0%} saved); {exhaustive_seconds:.0f} s -> {pruned_seconds:.0f} s",
              flush=True)
    exhaustive_epochs, pruned_epochs = (sum(o["epochs"][i] for o in outcomes) for i in (0, 1))
    return {"same_best": sum(o["same"] for o in outcomes), "seeds": seeds,
            "max_gap": max(o["gap"] for o in outcomes), "epochs_saved": round(1 - pruned_epochs / exhaustive_epochs, 3)}


def compare_batch(name: str, features, metric: str, seeds: int) -> dict:
    majority = Counter(features["val"].label.tolist()).most_common(1)[0][1] / len(features["val"])
    result = {}
    for batch_size in (256, 32):
        configs = grid_configs(FitConfig(metric=metric, batch_size=batch_size), seeds=range(seeds))
        rows, seconds = timed_grid(features, configs)
        summaries = summarise(rows, metric)
        best = summaries[0]
        by_lr = {}
        for summary in summaries:  # best first
            by_lr.setdefault(f"{summary.config['lr']:g}", round(summary.val_mean, 4))
        stuck = sum(1 for row in rows if row["val"]["accuracy"] <= majority + 1e-9)
        stuck_by_lr = Counter(row["config"]["lr"] for row in rows if row["val"]["accuracy"] <= majority + 1e-9)
        result[f"batch_{batch_size}"] = {"choice": config_name(best.config), "val": round(best.val_mean, 4),
                                         "test": round(best.test[metric], 4), "best_val_by_lr": by_lr, "stuck": stuck}
        print(f"batch {batch_size} on {name} ({seeds} seeds): chooses {config_name(best.config)}: val {metric} "
              f"{best.val_mean:.4f}, test {best.test[metric]:.4f}; best val by lr {by_lr}; {stuck} of {len(rows)} "
              f"runs never beat the majority class on validation (by lr: {dict(sorted(stuck_by_lr.items()))}); "
              f"{sum(r['epochs_run'] for r in rows)} epochs in {seconds:.0f} s", flush=True)
    result["same_choice"] = result["batch_256"]["choice"] == result["batch_32"]["choice"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = new_parser(__doc__)
    parser.add_argument("--cache", type=Path, required=True, help="a pooled cache, e.g. demo_out/demo.h5")
    parser.add_argument("--parts", default="bf16,prune,batch")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-seeds", type=int, default=1)
    parser.add_argument("--data", choices=("cache", "synthetic", "both"), default="both",
                        help="where the bf16 and prune parts run (batch: the cache)")
    add_threads(parser, 2)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    load = OtherLoad()
    cache, meta = load_features(args.cache)
    cache_metric = dataset_metric(meta["dataset"])
    synthetic = signal_features(SYNTHETIC_SIZES, seed=1)
    parts = args.parts.split(",")
    print(f"threads {args.threads}; CPU bf16 units: {bf16_units()}; cache {args.cache} ({meta['dataset']}, "
          f"{ {name: len(split) for name, split in cache.items()} }, metric {cache_metric}); synthetic "
          f"{SYNTHETIC_SIZES}, metric macro_f1", flush=True)
    summary: dict = {"bf16_units": bf16_units(), "threads": args.threads}
    for name, features, metric in (("cache", cache, cache_metric), ("synthetic", synthetic, "macro_f1")):
        if args.data not in (name, "both"):
            continue
        if "bf16" in parts:
            summary[f"bf16_{name}"] = compare_bf16(name, features, metric, args.seeds)
        if "prune" in parts:
            summary[f"prune_{name}"] = compare_prune(name, features, metric, args.seeds, FitConfig().batch_size)
    if "batch" in parts:
        summary["batch_cache"] = compare_batch("cache", cache, cache_metric, args.batch_seeds)
    others = load.cores()
    summary["other_load_cores"] = round(others, 2)
    return finish(summary, other_cores=others)


if __name__ == "__main__":
    main()
