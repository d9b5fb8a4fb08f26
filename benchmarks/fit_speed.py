"""Seconds per configuration-epoch of the stacked trainer against the same head written plainly, at the same batch
size, and the fraction of the machine's matmul rate each reaches; measured in one run.

    .venv/bin/python -m fusion.benchmarks.fit_speed [--threads 2] [--models 48] [--train-rows 4096] [--epochs 2]

Problem: pooled features (768-d text, 384-d image) with a learnable signal (common.py signal_features),
`--train-rows` train and an eighth as many validation rows (MVSA-Multi has 13,624 / 1,700: every cost below is per
epoch and grows with the rows). For the paper's three heads and batch 32 and 256:
- stacked: `train_many` on `--models` configurations of the paper's grid (lr x dropout x loss) in one pass, early
  stopping off, `--epochs` epochs of which the first is a warm-up; seconds per configuration-epoch.
- plain: the same head written plainly (PlainHead: nn.Linear modules, nn.Dropout, softmax attention over the two
  latents; torch.optim.Adam; randperm and index_select minibatches; the same focal loss), one configuration, the
  same batch size and epochs, timed after a warm-up epoch; each epoch scores the validation split as ours does.
- peer-style (informational): the plain head trained the way peer repositories do: DataLoader(batch 32, shuffle).
- limit: the epoch's matmul FLOPs (training forward + backward, validation forward; flops_per_sample) divided by
  the peak GEMM rate measured here for that precision (common.py gemm_rate, at the start and after every row: the
  rate of a shared machine drifts, so the highest seen is the limit); "of limit" is the limit over the measured
  time, the fraction of the machine's matmul rate reached. Each side counts its own FLOPs: the plain head computes
  Q, K and V of both tokens, ours a third fewer attention products (heads/layers.py pair_self_attention), so the
  same seconds are a smaller fraction for ours.
- bf16: the stacked self_attn pass at batch 256 in bf16 against fp32. Where the CPU has no bf16 units (AMX or
  avx512_bf16) bf16 is emulated, so only `--bf16-steps` steps are timed, each precision after one warm-up step.
The last line is JSON: gemm_fraction_fp32 (stacked self_attn, batch 256), stacked_vs_plain_same_batch_32 and _256
(plain seconds over stacked seconds per configuration-epoch, self_attn), bf16_speedup, bf16_units, threads,
other_load_cores.
"""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fusion import paper
from fusion.benchmarks.common import (IMAGE_DIM, TEXT_DIM, OtherLoad, add_threads, finish, gemm_rate, new_parser,
                                      signal_features, use_threads)
from fusion.device import bf16_units
from fusion.heads.config import FitConfig
from fusion.heads.losses import focal_loss
from fusion.heads.metrics import classification_metrics
from fusion.heads.registry import HEADS
from fusion.heads.search.configs import grid_configs
from fusion.heads.train import train_many

BENCH_HEADS = ("basic", "self_attn", "dual_attn")


def flops_per_sample(head: str, proj: int, hidden: int, written: str = "stacked", text_dim: int = TEXT_DIM,
                     image_dim: int = IMAGE_DIM) -> tuple[int, int]:
    """Matmul FLOPs of one sample (forward, backward) for pooled features, as `written` ("stacked": heads/models.py,
    or "plain": PlainHead). The backward of a matmul costs twice its forward (input and weight gradients), except
    the first layer, whose input needs no gradient."""
    spec = HEADS[head]
    first = sum(2 * dim * proj for name, dim in (("text", text_dim), ("image", image_dim)) if name in spec.modalities)
    middle = 0
    if spec.fusion in ("self_attn", "dual_attn"):
        # ours (heads/layers.py pair_self_attention): w (two products), W_V of two mixtures; plain: Q, K, V of both
        # tokens, then scores and weights x values
        middle += 4 * 2 * proj * proj if written == "stacked" else 2 * 2 * proj * 3 * proj + 2 * (2 * 2 * 2 * proj)
    if spec.fusion == "dual_attn":
        middle += 2 * (2 * proj * proj)  # one value projection each way (single-key cross-attention)
    fused = proj * len(spec.modalities)
    middle += 2 * fused * hidden + 2 * hidden * 3
    return first + middle, first + 2 * middle


def epoch_flops(head: str, train_rows: int, val_rows: int, written: str = "stacked") -> int:
    forward, backward = flops_per_sample(head, FitConfig().proj_dim, FitConfig().hidden, written)
    return train_rows * (forward + backward) + val_rows * forward


class PlainHead(nn.Module):
    """basic, self_attn or dual_attn on pooled features, written plainly (the math of heads/models.py)."""

    def __init__(self, head: str, dropout: float, proj: int = 256, hidden: int = 256):
        super().__init__()
        self.head, self.proj = head, proj
        self.text_proj, self.image_proj = nn.Linear(TEXT_DIM, proj), nn.Linear(IMAGE_DIM, proj)
        if head == "dual_attn":  # a softmax over one key is 1: each modality becomes the other's value
            self.text_value, self.image_value = (nn.Linear(proj, proj, bias=False) for _ in range(2))
        if head != "basic":
            self.qkv = nn.Linear(proj, 3 * proj, bias=False)
        self.hidden, self.out, self.dropout = nn.Linear(2 * proj, hidden), nn.Linear(hidden, 3), nn.Dropout(dropout)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        t, v = self.text_proj(text), self.image_proj(image)
        if self.head == "dual_attn":
            t, v = self.image_value(v), self.text_value(t)
        if self.head == "basic":
            fused = torch.cat((t, v), dim=-1)
        else:
            query, key, value = self.qkv(torch.stack((t, v), dim=1)).chunk(3, dim=-1)
            weights = torch.softmax(query @ key.transpose(1, 2) / math.sqrt(self.proj), dim=-1)
            fused = (weights @ value).flatten(1)
        return self.out(self.dropout(torch.relu(self.hidden(self.dropout(fused)))))


class PlainRun:
    """One configuration trained plainly; epoch() trains one epoch then scores validation -> the val metrics."""

    def __init__(self, features: dict, config: FitConfig, seed: int = 0, device: str | torch.device = "cpu"):
        torch.manual_seed(seed)
        self.features, self.config, self.device = features, config, torch.device(device)
        self.model = PlainHead(config.head, config.dropout).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.text, self.image, self.label = self._pooled("train")
        self.val_text, self.val_image, self.val_label = self._pooled("val")

    def _pooled(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.features[split]
        return tuple(t.to(self.device) for t in (rows.text.tokens[:, 0], rows.image.tokens[:, 0], rows.label))

    def epoch(self) -> dict:
        self.model.train()
        order = torch.randperm(len(self.label)).to(self.device)
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start:start + self.config.batch_size]
            self.step(self.text.index_select(0, rows), self.image.index_select(0, rows),
                      self.label.index_select(0, rows))
        return self.validate()

    def step(self, text: torch.Tensor, image: torch.Tensor, label: torch.Tensor) -> None:
        loss = focal_loss(self.model(text, image), label, self.config.focal_gamma)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def validate(self) -> dict:
        self.model.eval()
        with torch.no_grad():
            predictions = self.model(self.val_text, self.val_image).argmax(dim=-1).cpu()
        return classification_metrics(self.features["val"].label.numpy(), predictions.numpy())


def plain_seconds_per_epoch(features: dict, config: FitConfig, epochs: int) -> float:
    run = PlainRun(features, config)
    run.epoch()  # warm-up
    start = time.perf_counter()
    for _ in range(epochs - 1):
        run.epoch()
    return (time.perf_counter() - start) / (epochs - 1)


def peer_seconds_per_epoch(features: dict, config: FitConfig) -> float:
    """DataLoader(batch 32, shuffle) over a TensorDataset, as peer repositories train; one epoch after a warm-up."""
    run = PlainRun(features, config)
    loader = DataLoader(TensorDataset(run.text, run.image, run.label), batch_size=32, shuffle=True)

    def epoch():
        run.model.train()
        for text, image, label in loader:
            run.step(text, image, label)
        run.validate()

    epoch()
    start = time.perf_counter()
    epoch()
    return time.perf_counter() - start


def stack_configs(head: str, models: int, batch_size: int, epochs: int, precision: str = "fp32") -> list[FitConfig]:
    base = FitConfig(head=head, epochs=epochs, patience=epochs + 1, batch_size=batch_size, precision=precision)
    configs = grid_configs(base, heads=[head], lrs=paper.LRS, dropouts=paper.DROPOUTS, losses=paper.LOSSES)
    return (configs * math.ceil(models / len(configs)))[:models]


def stacked_seconds_per_config_epoch(features: dict, head: str, models: int, batch_size: int, epochs: int) -> float:
    """A pass of `models` configurations; the first epoch is the warm-up (its time is subtracted)."""
    first = {}
    configs = stack_configs(head, models, batch_size, epochs)
    train_many(features, configs, on_epoch=lambda epoch, index, _: first.setdefault(epoch, time.perf_counter()))
    end = time.perf_counter()
    return (end - first[1]) / (epochs - 1) / models


def bf16_speedup(features: dict, models: int, steps: int) -> tuple[float, float]:
    """Seconds per step of the stacked self_attn pass at batch 256 (one epoch of `steps` steps over that many rows,
    validation on 64), fp32 and bf16, each after a one-step warm-up run."""
    seconds = []
    for precision in ("fp32", "bf16"):
        configs = stack_configs("self_attn", models, 256, 1, precision)
        for rows in (256, 256 * steps):
            subset = {"train": features["train"].rows(slice(0, rows)), "val": features["val"].rows(slice(0, 64))}
            start = time.perf_counter()
            train_many(subset, configs)
        seconds.append((time.perf_counter() - start) / steps)
    return seconds[0], seconds[1]


def main(argv: list[str] | None = None) -> dict:
    parser = new_parser(__doc__)
    add_threads(parser, 2)
    parser.add_argument("--models", type=int, default=48)
    parser.add_argument("--train-rows", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2, help="including the warm-up epoch")
    parser.add_argument("--bf16-steps", type=int, default=None, help="default: 4 without bf16 units, else an epoch")
    args = parser.parse_args(argv)
    use_threads(args.threads)
    load = OtherLoad()
    rows = {"train": args.train_rows, "val": args.train_rows // 8}
    features = signal_features(rows)
    units = bf16_units()
    rates = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    print(f"threads {torch.get_num_threads()}; CPU bf16 units: {units}; GEMM fp32 {rates['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s; {args.models} stacked models; epochs over {rows} rows "
          f"(MVSA-Multi: 13,624 / 1,700); load average {os.getloadavg()[0]:.2f}", flush=True)
    table, fp32_rates = {}, [rates["fp32"]]
    for head in BENCH_HEADS:
        for batch in (32, 256):
            stacked = stacked_seconds_per_config_epoch(features, head, args.models, batch, args.epochs)
            plain = plain_seconds_per_epoch(features, FitConfig(head=head, batch_size=batch), args.epochs)
            fp32_rates.append(gemm_rate(torch.float32))
            table[head, batch] = {"stacked": stacked, "plain": plain}
            print(f"  {head} batch {batch}: stacked {stacked:.3f} s per configuration-epoch, plain {plain:.3f} s per "
                  f"epoch; GEMM fp32 {fp32_rates[-1] / 1e9:.1f} GFLOP/s", flush=True)
    peak = max(fp32_rates)
    print(f"of limit: against the peak fp32 GEMM rate of the run, {peak / 1e9:.1f} GFLOP/s (measured "
          f"{len(fp32_rates)} times: {min(fp32_rates) / 1e9:.1f} to {peak / 1e9:.1f})")
    print(f"{'head':<10} {'batch':>5} {'stacked s/cfg-ep':>16} {'of limit':>8} {'plain s/ep':>10} {'of limit':>8} "
          f"{'stacked vs plain':>16}")
    for (head, batch), row in table.items():
        limit, plain_limit = (epoch_flops(head, rows["train"], rows["val"], written) / peak
                              for written in ("stacked", "plain"))
        row["fraction"] = limit / row["stacked"]
        print(f"{head:<10} {batch:>5} {row['stacked']:>16.3f} {row['fraction']:>8.1%} {row['plain']:>10.3f} "
              f"{plain_limit / row['plain']:>8.1%} {row['plain'] / row['stacked']:>15.1f}x", flush=True)
    peer = peer_seconds_per_epoch(features, FitConfig(head="self_attn"))
    print(f"peer-style self_attn (DataLoader, batch 32, one configuration): {peer:.3f} s/epoch, "
          f"{peer / table['self_attn', 32]['stacked']:.1f}x the stacked batch-32 seconds per configuration-epoch "
          "(informational)")
    steps = args.bf16_steps or (4 if units == "none" else max(1, rows["train"] // 256))
    fp32_step, bf16_step = bf16_speedup(features, args.models, steps)
    print(f"bf16 vs fp32, stacked self_attn at batch 256, {steps} steps: {fp32_step:.3f} s/step fp32, "
          f"{bf16_step:.3f} s/step bf16" + (" (emulated: this CPU has no bf16 units)" if units == "none" else ""))
    others = load.cores()
    summary = {"gemm_fraction_fp32": round(table["self_attn", 256]["fraction"], 3),
               "stacked_vs_plain_same_batch_32": round(table["self_attn", 32]["plain"] /
                                                       table["self_attn", 32]["stacked"], 2),
               "stacked_vs_plain_same_batch_256": round(table["self_attn", 256]["plain"] /
                                                        table["self_attn", 256]["stacked"], 2),
               "bf16_speedup": round(fp32_step / bf16_step, 3), "bf16_units": units,
               "threads": torch.get_num_threads(), "other_load_cores": round(others, 2)}
    return finish(summary, other_cores=others)


if __name__ == "__main__":
    main()
