"""Training heads on cached features, many configurations in one vectorised pass. No printing; the only I/O is a
streamed token split reading its minibatches (heads/streamed.py).

How the vectorisation works
- Configs are grouped by (head, seed, batch_size, proj_dim, hidden); each group is ONE pass (several when its
  models would outgrow the memory budget: see models_per_pass) whose M models have their
  parameters stacked with a leading model dimension (heads/layers.py): the shared first layer is one GEMM of width
  M*256, the rest batched matmuls. Per model: learning rate, dropout rate, loss (focal gamma, alpha), epochs,
  patience and metric.
- Every model of a pass sees the same minibatch order (randperm from a generator seeded by the seed) and the same
  dropout noise (a second generator; each model thresholds it at its own rate). So a model's run does not depend on
  which other configs share its pass: train_many(features, configs)[i] == train_head(features, configs[i]) up to
  float rounding (tests/test_train.py). Different seeds (or batch sizes) go to different passes.
- Each model's initial weights come from its own generator seeded by its head name and seed (models.init_params).
- A model that stops early (patience or its own epoch limit) is dropped from the stack, so it costs nothing more;
  its best-on-validation weights were copied aside whenever it improved, and test metrics come from those. With
  `prune` (heads/search/prune.py), the worst models still training are also dropped at the rungs, the same way.
- Device and precision: every tensor is made on the device the features are moved to (random draws come from CPU
  generators, so a seed means the same minibatches and dropout masks everywhere). A bf16 config computes its
  forward and backward passes in bf16 (device.py head_dtype): the features are cast once per pass, the weights
  once per step (a bf16 copy that heads/optim.py BatchedAdam refreshes), the logits to fp32 for the loss before
  the output bias is added (models.FULL_PRECISION), and the gradients to fp32 for Adam, whose weights and state stay
  fp32. Precision is part of the config, so bf16 and fp32 models never share a pass.
"""

from __future__ import annotations

import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.profiler import record_function

from fusion.heads.config import FitConfig
from fusion.device import head_dtype
from fusion.heads.optim import BatchedAdam, ParamStack
from fusion.heads.result import FitResult, TestPredictions
from fusion.heads.features import Modality, SplitFeatures
from fusion.heads.losses import focal_loss, focal_loss_per_sample
from fusion.heads.metrics import classification_metrics, confusion_counts
from fusion.heads.layers import DropoutRates, without_tiny_gradients
from fusion.heads.models import FULL_PRECISION, head_forward, init_params, param_shapes, stacked_pieces
from fusion.heads.posthoc.record import record_posthoc
from fusion.heads.registry import HEADS, HeadSpec, fused_dim
from fusion.errors import FusionError
from fusion.memory import available_memory

if TYPE_CHECKING:  # the schedule is the search's (heads/search/prune.py); the trainer only calls it
    from fusion.heads.search.prune import Pruning

# What torch.profiler sees a training step and an evaluation as (benchmarks/step_profile.py counts per step by them).
TRAIN_STEP, EVALUATION = "fusion.train_step", "fusion.evaluation"


def train_head(features: dict[str, SplitFeatures], config: FitConfig, on_epoch=None, *,
               threads: int | None = None, device: torch.device | str | None = None) -> FitResult:
    """Train one head; on_epoch(epoch, 0, metrics) after every epoch."""
    return train_many(features, [config], on_epoch, threads=threads, device=device)[0]


def train_many(features: dict[str, SplitFeatures], configs: list[FitConfig], on_epoch=None, *,
               threads: int | None = None, memory_budget: int | None = None,
               device: torch.device | str | None = None, prune: Pruning | None = None) -> list[FitResult]:
    """Train every config (results in the same order), vectorised across configs; on_epoch(epoch, index, metrics).

    threads: torch's intra-op thread count for the call (restored afterwards); None leaves it alone.
    memory_budget: bytes a pass's activations may take (default: half the memory available now on the device); a
    group whose models would need more trains in several passes, which changes no result (but pruning then ranks
    each pass's models apart).
    device: where to train (default: where the training features are); the features are moved there (a streamed
    split, each minibatch as it is read).
    prune: successive halving inside each pass (heads/search/prune.py); None trains every model to its own end.
    Each result also carries its temperature fitted on validation and the training means (heads/posthoc/record.py).
    """
    _check_features(features)
    device = torch.device(device) if device is not None else features["train"].label.device
    if device.type == "cuda" and device.index is None:  # "cuda" names the current GPU; tensors say which
        device = torch.device("cuda", torch.cuda.current_device())
    budget = _available_memory(device) // 2 if memory_budget is None else memory_budget
    results: list[FitResult | None] = [None] * len(configs)
    with _num_threads(threads):
        for group in group_configs(configs).values():
            size = models_per_pass(configs[group[0]], features, budget)
            for indices in (group[start:start + size] for start in range(0, len(group), size)):
                passed = [configs[i] for i in indices]
                trained = _Pass(features, passed, indices, on_epoch, device, prune).run()
                for index, result in zip(indices, trained):
                    results[index] = result
        record_posthoc(features, results, device)  # temperatures, test logits, training means
    return results


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def models_per_pass(config: FitConfig, features: dict[str, SplitFeatures], budget: int) -> int:
    """How many models of `config`'s architecture fit `budget` bytes (bytes_per_model each)."""
    return max(1, budget // bytes_per_model(config, features))


def bytes_per_model(config: FitConfig, features: dict[str, SplitFeatures]) -> int:
    """One stacked model's memory in a training step: its parameters in PARAM_COPIES (weights, gradients, Adam's
    two moments, the best weights) and ACTIVATION_COPIES times its values_per_row for each row of its batch
    (heads/layers.py token_cross_attention projects no token)."""
    spec, train = HEADS[config.head], features["train"]
    parameters = sum(math.prod(shape) for shape in
                     param_shapes(spec, *train.dims, config.proj_dim, config.hidden).values())
    per_row = values_per_row(spec, train, config.proj_dim, config.hidden)
    return 4 * (PARAM_COPIES * parameters + ACTIVATION_COPIES * config.batch_size * per_row)


def values_per_row(spec: HeadSpec, split: SplitFeatures, proj_dim: int, hidden: int) -> int:
    """Float32 values one model holds per row: its latents, and for dual_attn on token sequences a score per token
    and the queries and weighted means in the encoders' width."""
    per_row = 2 * max(proj_dim, hidden)
    if spec.fusion == "dual_attn" and split.tokens_per_row > 2:
        per_row += split.tokens_per_row + 2 * sum(split.dims)
    return per_row


# Measured: at batch 256 on 385 tokens a row (128 x 768 and 257 x 384), each dual_attn model stacked into a pass
# (2, 10, 26) added ~30 MiB to the peak; these copies estimate 38.
PARAM_COPIES, ACTIVATION_COPIES = 5, 6


def group_configs(configs: list[FitConfig]) -> dict[tuple, list[int]]:
    """Indices of the configs that can share a pass: same architecture, seed, batch size and precision."""
    groups: dict[tuple, list[int]] = {}
    for index, config in enumerate(configs):
        key = (config.head, config.seed, config.batch_size, config.proj_dim, config.hidden, config.precision)
        groups.setdefault(key, []).append(index)
    return groups


@dataclass
class _Tracker:
    """Early stopping and history of one model."""
    config: FitConfig
    history: list[dict] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    seconds: float = 0.0
    pruned_at: int | None = None  # the rung epoch at which pruning stopped this model

    def update(self, entry: dict) -> tuple[bool, bool]:
        """Record an epoch -> (improved, done)."""
        self.history.append(entry)
        improved = entry[self.config.metric] > self.best_score
        if improved:
            self.best_score, self.best_epoch = entry[self.config.metric], entry["epoch"]
        done = entry["epoch"] >= self.config.epochs or entry["epoch"] - self.best_epoch >= self.config.patience
        return improved, done


class _Pass:
    """The configs of one group trained together (see the module docstring)."""

    def __init__(self, features: dict[str, SplitFeatures], configs: list[FitConfig], indices: list[int], on_epoch,
                 device: torch.device, prune: Pruning | None = None):
        first = configs[0]
        self.spec = HEADS[first.head]
        if self.spec.fusion != "dual_attn":  # only cross-modal attention reads past token 0: gather less per step
            features = {name: split.latents_only() for name, split in features.items()}
        self.device, self.dtype = device, head_dtype(first.precision)
        self.features = {name: _moved(split, device, self.dtype) for name, split in features.items()}
        self.configs, self.indices, self.on_epoch = configs, indices, on_epoch
        self.proj_dim, self.hidden = first.proj_dim, first.hidden
        self.batch_size = first.batch_size
        self.noise_dims = (fused_dim(self.spec, first.proj_dim), first.hidden)
        self.shapes = param_shapes(self.spec, *features["train"].dims, first.proj_dim, first.hidden)
        stack = ParamStack.from_models(self.shapes, [init_params(self.shapes, c.head, c.seed) for c in configs],
                                       device, pieces=stacked_pieces(self.shapes))
        self.adam = BatchedAdam(stack, [c.lr for c in configs], compute_dtype=self.dtype,
                                full_precision=FULL_PRECISION)
        self.best = {name: p.detach().clone() for name, p in stack.params.items()}
        self.trackers = [_Tracker(c) for c in configs]
        self.active = torch.arange(len(configs))  # config positions of the models still training
        self.prune = prune
        self.rungs = set(prune.rungs(max(c.epochs for c in configs))) if prune else set()
        self.order = torch.Generator().manual_seed(zlib.crc32(f"order:{first.seed}".encode()))
        self.noise = torch.Generator().manual_seed(zlib.crc32(f"dropout:{first.seed}".encode()))
        self.started = time.perf_counter()

    def run(self) -> list[FitResult]:
        for epoch in range(1, max(c.epochs for c in self.configs) + 1):
            train_loss = self._train_epoch()
            val_loss, val_pred = self._evaluate(self.features["val"], self.adam.params, self.active)
            self._record(epoch, train_loss, val_loss, val_pred)
            if len(self.active) == 0:
                break
        return self._results()

    def _model_inputs(self, positions: Tensor) -> tuple[DropoutRates | None, Tensor, Tensor | None]:
        """Dropout rates (None when all 0: no noise drawn), focal gammas and alphas (None when all None)."""
        configs = [self.configs[i] for i in positions.tolist()]
        rates = torch.tensor([c.dropout for c in configs], device=self.device)
        gammas = torch.tensor([c.focal_gamma for c in configs], device=self.device)
        alphas = None
        if any(c.alpha is not None for c in configs):
            alphas = torch.tensor([c.alpha if c.alpha is not None else (1.0, 1.0, 1.0) for c in configs],
                                  device=self.device)
        return (DropoutRates.of(rates, self.dtype) if bool((rates > 0).any()) else None), gammas, alphas

    def _train_epoch(self) -> Tensor:
        """One epoch over the shuffled training split -> the mean training loss of each active model."""
        train, adam = self.features["train"], self.adam
        rates, gammas, alphas = self._model_inputs(self.active)
        params = list(adam.params.values())
        order = torch.randperm(len(train), generator=self.order).to(train.label.device)
        total = torch.zeros(len(self.active), device=self.device)
        for batch in train.batches(order[start:start + self.batch_size] for start in range(0, len(train),
                                                                                          self.batch_size)):
            with record_function(TRAIN_STEP):
                batch = _moved(batch, self.device, self.dtype)
                noise = None if rates is None else tuple(torch.rand(len(batch), d, generator=self.noise)
                                                         .to(self.device) for d in self.noise_dims)
                logits = head_forward(self.spec, adam.params, batch.text, batch.image, rates, noise)
                losses = focal_loss(without_tiny_gradients(logits), batch.label, gammas, alphas)
                # Parameters a head never uses (Q/K of a single-key cross-attention) get zero gradients: Adam
                # leaves them.
                grads = torch.autograd.grad(losses.sum(), params, allow_unused=True, materialize_grads=True)
                adam.step(grads)
                total.add_(losses.detach(), alpha=len(batch))
        return total / len(train)

    @torch.no_grad()
    @record_function(EVALUATION)
    def _evaluate(self, split: SplitFeatures, params: dict[str, Tensor], positions: Tensor) -> tuple[Tensor, Tensor]:
        """Mean loss (M,) and predictions (M, N) of the models at `positions` (no dropout); `params` in the
        compute dtype."""
        _, gammas, alphas = self._model_inputs(positions)
        chunk = _eval_chunk(split, len(positions), values_per_row(self.spec, split, self.proj_dim, self.hidden))
        loss_sum, predictions = torch.zeros(len(positions), device=self.device), []
        for rows in split.batches(slice(start, start + chunk) for start in range(0, len(split), chunk)):
            rows = _moved(rows, self.device, self.dtype)
            logits = head_forward(self.spec, params, rows.text, rows.image)
            loss_sum += focal_loss_per_sample(logits, rows.label, gammas, alphas).sum(dim=-1)
            predictions.append(logits.argmax(dim=-1))
        return (loss_sum / max(len(split), 1)).cpu(), torch.cat(predictions, dim=1).cpu()

    def _record(self, epoch: int, train_loss: Tensor, val_loss: Tensor, val_pred: Tensor) -> None:
        """Metrics, callbacks and early stopping for the active models; copies improved weights, drops stopped ones."""
        labels = self.features["val"].label.cpu().numpy()
        improved, keep = [], []
        for row, position in enumerate(self.active.tolist()):
            entry = {"epoch": epoch, "train_loss": float(train_loss[row]), "val_loss": float(val_loss[row]),
                     **classification_metrics(labels, val_pred[row].numpy())}
            better, done = self.trackers[position].update(entry)
            if better:
                improved.append(row)
            if done:
                self.trackers[position].seconds = time.perf_counter() - self.started
            else:
                keep.append(row)
            if self.on_epoch is not None:
                self.on_epoch(epoch, self.indices[position], entry)
        self._copy_best(torch.tensor(improved, dtype=torch.long))
        if epoch in self.rungs:
            keep = self._prune(epoch, keep)
        if len(keep) < len(self.active):
            keep_rows = torch.tensor(keep, dtype=torch.long)
            self.adam = self.adam.keep(keep_rows)
            self.active = self.active[keep_rows]

    def _prune(self, epoch: int, keep: list[int]) -> list[int]:
        """The rows of `keep` (models still training) that survive this rung; the others stop here."""
        positions = [int(self.active[row]) for row in keep]
        chosen = set(self.prune.survivors([self.trackers[p].best_score for p in positions]))
        for rank, position in enumerate(positions):
            if rank not in chosen:
                self.trackers[position].pruned_at = epoch
                self.trackers[position].seconds = time.perf_counter() - self.started
        return [row for rank, row in enumerate(keep) if rank in chosen]

    def _copy_best(self, rows: Tensor) -> None:
        if len(rows):
            targets, rows = self.active[rows].to(self.device), rows.to(self.device)
            stack = self.adam.stack
            for name, param in stack.params.items():
                dim = stack.model_dim(name)
                self.best[name].index_copy_(dim, targets, param.detach().index_select(dim, rows))

    def _results(self) -> list[FitResult]:
        everyone = torch.arange(len(self.configs))
        test = self.features.get("test")
        test_metrics: list[dict | None] = [None] * len(self.configs)
        test_predictions: list[TestPredictions | None] = [None] * len(self.configs)
        if test is not None and len(test):
            best = {name: tensor if name in FULL_PRECISION else tensor.to(self.dtype)
                    for name, tensor in self.best.items()}
            losses, predictions = self._evaluate(test, best, everyone)
            labels = test.label.cpu().numpy()
            test_metrics = [{**classification_metrics(labels, predictions[i].numpy()), "loss": float(losses[i]),
                             "confusion_matrix": confusion_counts(labels, predictions[i].numpy())}
                            for i in range(len(self.configs))]
            test_predictions = [TestPredictions(labels.tolist(), predictions[i].tolist(), getattr(test, "ids", None))
                                for i in range(len(self.configs))]
        results = [self._result(i, test_metrics[i]) for i in range(len(self.configs))]
        for result, predicted in zip(results, test_predictions):
            result.test_predictions = predicted
        return results

    def _result(self, position: int, test: dict | None) -> FitResult:
        tracker = self.trackers[position]
        best = tracker.history[tracker.best_epoch - 1]
        val = {key: value for key, value in best.items() if key not in ("epoch", "train_loss", "val_loss")}
        val["loss"] = best["val_loss"]
        state = {name: self.adam.stack.of_model(name, tensor, position).cpu().clone()
                 for name, tensor in self.best.items()}
        return FitResult(tracker.config, tracker.best_epoch, len(tracker.history), tracker.history, val, test,
                         state, tracker.seconds, pruned_at=tracker.pruned_at, device=str(self.device))


def _eval_chunk(split: SplitFeatures, models: int, model_values_per_row: int) -> int:
    """Rows per evaluation chunk: a chunk's tokens as read and every model's values_per_row stay near 128 MB (32M
    float32 values)."""
    per_row = split.tokens_per_row * max(split.dims) + models * model_values_per_row
    return max(1, min(4096, (1 << 25) // per_row))


def _moved(split, device: torch.device, dtype: torch.dtype):
    """An in-memory split (or minibatch) on `device` in `dtype`; the same object when it is so already. A streamed
    split stays as it is: its minibatches are moved as they are read."""
    if not isinstance(split, SplitFeatures) or (split.label.device == device and split.text.tokens.dtype == dtype):
        return split
    moved = SplitFeatures(*(Modality(m.tokens.to(device, dtype), m.mask.to(device)) for m in (split.text, split.image)),
                          split.label.to(device))
    moved.ids = split.ids
    return moved


def _check_features(features: dict[str, SplitFeatures]) -> None:
    for split in ("train", "val"):
        if split not in features or len(features[split]) == 0:
            raise FusionError(f"training needs a non-empty {split} split")
    dims = {split.dims for split in features.values()}
    if len(dims) != 1:
        raise FusionError(f"the splits' feature dimensions differ: {sorted(dims)}")
    for name, split in features.items():
        if split.label.numel() and (int(split.label.min()) < 0 or int(split.label.max()) > 2):
            raise FusionError(f"split {name} has labels outside 0..2")


@contextmanager
def _num_threads(threads: int | None):
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
