"""Seconds per epoch of our trainer against a plain DataLoader loop, and achieved FLOP/s against the machine's GEMM.

    .venv/bin/python benchmarks/fit_speed.py [--threads 2] [--epochs 3] [--stack 12]

Problem: MVSA-Multi sized (13,624 train / 1,700 val / 1,700 test), 768-d text, 384-d image, random features and
labels, in memory. For each of the 5 heads, all in one run:
- ours: train_head with the default FitConfig (its batch size), `--epochs` epochs (early stopping off); an epoch
  includes the validation pass and metrics; also `--stack` configs (different lr/dropout/gamma) in one train_many
  pass, reported per config.
- baseline: the same head (build_head: the same nn.Module math) trained the way peer repositories do: DataLoader
  over a TensorDataset, batch 32, shuffle=True, torch.optim.Adam, the same focal loss, one config; each epoch then
  scores the validation split in one forward pass (cheaper than our epoch's validation, so the ratio is not
  flattered).
- FLOP/s: the matmul FLOPs of forward + backward of one training epoch plus the validation forward, counted
  analytically (flops_per_sample; torch.utils.flop_counter agrees within 0.3%), divided by our seconds per epoch,
  as a fraction of the float32 GEMM throughput measured here with a large torch.mm.
- ceiling: the speedup a trainer running at 100% of the GEMM throughput would reach (baseline seconds / (epoch
  FLOPs / GEMM FLOP/s)); both loops do the same matmuls, so no trainer can beat it at float32.
The last line is JSON with the slowest head's figures (single config).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from fusion.heads.config import FitConfig
from fusion.heads.features import split_features
from fusion.heads.losses import focal_loss
from fusion.heads.metrics import classification_metrics
from fusion.heads.models import build_head
from fusion.heads.registry import HEADS, list_heads
from fusion.heads.train import train_head, train_many

SIZES = {"train": 13_624, "val": 1_700, "test": 1_700}
TEXT_DIM, IMAGE_DIM = 768, 384


def synthetic_features(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {split: split_features(torch.randn(n, TEXT_DIM, generator=generator),
                                  torch.randn(n, IMAGE_DIM, generator=generator),
                                  torch.randint(0, 3, (n,), generator=generator))
            for split, n in SIZES.items()}


def flops_per_sample(head: str, proj: int, hidden: int) -> tuple[int, int]:
    """Matmul FLOPs of one sample (forward, backward) for pooled features. The backward of a matmul costs twice its
    forward (input and weight gradients), except the first layer, whose input needs no gradient."""
    spec = HEADS[head]
    first = sum(2 * dim * proj for name, dim in (("text", TEXT_DIM), ("image", IMAGE_DIM)) if name in spec.modalities)
    middle = 0
    if spec.fusion in ("self_attn", "dual_attn"):
        middle += 2 * 2 * proj * 3 * proj + 2 * (2 * 2 * 2 * proj)  # QKV of 2 tokens; scores and weights x values
    if spec.fusion == "dual_attn":
        middle += 2 * (2 * proj * proj)  # one value projection each way (single-key cross-attention)
    fused = proj * len(spec.modalities)
    middle += 2 * fused * hidden + 2 * hidden * 3
    return first + middle, first + 2 * middle


def gemm_flops_per_second(size: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def ours_seconds_per_epoch(features: dict, head: str, epochs: int) -> float:
    config = FitConfig(head=head, epochs=epochs, patience=epochs + 1)
    result = train_head(features, config)
    return result.seconds / result.epochs_run


def stacked_seconds_per_config_epoch(features: dict, head: str, epochs: int, count: int) -> float:
    grid = [(lr, dropout, gamma) for lr in (1e-2, 1e-3, 1e-4, 1e-5) for dropout in (0.0, 0.2, 0.5)
            for gamma in (0.0, 2.0, 3.0, 4.0)]
    configs = [FitConfig(head=head, lr=lr, dropout=d, loss="focal", gamma=g, epochs=epochs, patience=epochs + 1)
               for lr, d, g in grid[:count]]
    start = time.perf_counter()
    train_many(features, configs)
    return (time.perf_counter() - start) / epochs / count


def dataloader_seconds_per_epoch(features: dict, head: str, epochs: int = 1) -> float:
    """The peer-repository loop: DataLoader(batch 32, shuffle) + nn.Module + torch.optim.Adam, one config."""
    config = FitConfig(head=head)
    train, val = features["train"], features["val"]
    model = build_head(config, TEXT_DIM, IMAGE_DIM)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loader = DataLoader(TensorDataset(train.text.tokens[:, 0], train.image.tokens[:, 0], train.label),
                        batch_size=32, shuffle=True)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for text, image, label in loader:
            optimizer.zero_grad()
            loss = focal_loss(model(text, image), label, config.focal_gamma)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            predictions = model(val.text, val.image).argmax(dim=-1)
        classification_metrics(val.label.numpy(), predictions.numpy())
    return (time.perf_counter() - start) / epochs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--stack", type=int, default=12, help="configs per train_many pass (0 skips it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    features = synthetic_features()
    gemm = gemm_flops_per_second()
    default = FitConfig()
    print(f"threads {args.threads}; float32 GEMM {gemm / 1e9:.1f} GFLOP/s; our batch {default.batch_size}, "
          f"baseline batch 32; sizes {SIZES}")
    print(f"{'head':<11} {'dataloader s/ep':>15} {'ours s/ep':>10} {'speedup':>8} {'ceiling':>8} {'GFLOP/s':>8} "
          f"{'of GEMM':>8} "
          f"{'stacked s/cfg/ep':>17} {'stacked of GEMM':>16}")
    rows = {}
    for head in list_heads():
        rows[head] = measure_head(features, head, args, gemm)
        print_row(head, rows[head])
    slowest = max(rows.values(), key=lambda row: row["ours"])
    summary = {"speedup_vs_dataloader": round(slowest["speedup"], 2), "gemm_fraction": round(slowest["fraction"], 3),
               "slowest_head": slowest["head"], "speedup_ceiling": round(slowest["ceiling"], 2),
               "stacked_gemm_fraction": slowest.get("stacked_fraction"),
               "threads": args.threads}
    print(json.dumps(summary))
    return summary


def measure_head(features: dict, head: str, args, gemm: float) -> dict:
    default = FitConfig()
    forward, backward = flops_per_sample(head, default.proj_dim, default.hidden)
    epoch_flops = SIZES["train"] * (forward + backward) + SIZES["val"] * forward
    baseline = dataloader_seconds_per_epoch(features, head)
    ours = ours_seconds_per_epoch(features, head, args.epochs)
    row = {"head": head, "baseline": baseline, "ours": ours, "speedup": baseline / ours,
           "flops": epoch_flops / ours, "fraction": epoch_flops / ours / gemm,
           "ceiling": baseline / (epoch_flops / gemm)}
    if args.stack:
        stacked = stacked_seconds_per_config_epoch(features, head, args.epochs, args.stack)
        row.update(stacked=stacked, stacked_fraction=round(epoch_flops / stacked / gemm, 3))
    return row


def print_row(head: str, row: dict) -> None:
    stacked = (f"{row['stacked']:>17.3f} {row['stacked_fraction']:>16.1%}" if "stacked" in row else "")
    print(f"{head:<11} {row['baseline']:>15.3f} {row['ours']:>10.3f} {row['speedup']:>7.1f}x {row['ceiling']:>7.1f}x "
          f"{row['flops'] / 1e9:>8.1f} {row['fraction']:>8.1%} {stacked}")


if __name__ == "__main__":
    main()
