"""Where a training step's time goes: 48 stacked self_attn and dual_attn models of the paper's grid at batch 256, in
fp32 and bf16, under torch.profiler.

    .venv/bin/python -m fusion.benchmarks.step_profile [--threads 2] [--epochs 3] [--precisions fp32,bf16]

Features: common.py signal_features at MVSA-Multi's training and validation sizes (13,624 / 1,700 rows; --scale
shrinks them), pooled, in memory. Per precision and head: `train_many` on the head's 48 configurations of the paper's
grid (4 learning rates x 3 dropouts x 4 losses) for --epochs epochs (early stopping off: patience = epochs, so every
model trains every step), after one untimed warm-up epoch. By self CPU time over the whole run (steps and
validation), it prints the share of:
- matrix products (mm, bmm, addmm, baddbmm, ...);
- `copy_` (dtype casts and layout changes), with its calls per training step (heads/train.py TRAIN_STEP ranges)
  beside the number of parameter blocks;
- elementwise work (pointwise arithmetic, comparisons, activations and their backward ops, fills);
- the rest by kind (reductions and softmax, cat/stack, Adam, the Python between operators), and the costliest
  operators.
Calls per step do not depend on the machine, so they can be checked where bf16 is emulated (bf16 units "none"); the
shares and seconds can not. --compile-check also times torch.compile of the first head's step against the eager
step (compile_check). The last line is one JSON object: per precision and head, seconds, shares and copy_ calls per
step; the compile check's figures.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter, defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from fusion.benchmarks.common import (MVSA_MULTI, OtherLoad, add_threads, finish, new_parser, signal_features,
                                      use_threads)
from fusion.device import HEAD_PRECISIONS, bf16_units, head_dtype
from fusion.heads.config import FitConfig
from fusion.heads.features import Modality
from fusion.heads.layers import DropoutRates
from fusion.heads.losses import focal_loss
from fusion.heads.models import FULL_PRECISION, head_forward, init_params, param_shapes, stacked_pieces
from fusion.heads.optim import BatchedAdam, ParamStack
from fusion.heads.registry import HEADS, fused_dim
from fusion.heads.search.configs import grid_configs
from fusion.heads.train import TRAIN_STEP, train_many

PROFILED_HEADS = ("self_attn", "dual_attn")
MATRIX_PRODUCTS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::mv",
                   "aten::addmv", "aten::dot", "aten::_addmm_activation", "mkldnn::_linear_pointwise"}
COPIES = {"aten::copy_"}
ELEMENTWISE = {f"aten::{name}" for name in (
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "reciprocal", "sigmoid",
    "sigmoid_backward", "relu", "threshold_backward", "ge", "gt", "le", "lt", "eq", "ne", "where", "masked_fill",
    "masked_fill_", "exp", "expm1", "log", "pow", "clamp_min", "clamp", "clamp_min_", "sqrt", "sqrt_", "lerp_",
    "addcmul_", "addcdiv_", "fill_", "zero_", "abs", "sign", "maximum", "minimum", "bernoulli_", "native_dropout",
    "native_dropout_backward", "_masked_scale", "logical_not", "bitwise_not")}
REDUCTIONS = {f"aten::{name}" for name in (
    "sum", "mean", "_log_softmax", "_log_softmax_backward_data", "_softmax", "_softmax_backward_data", "argmax",
    "max", "gather", "scatter_add_", "index_select", "index_copy_", "nll_loss_forward", "nll_loss_backward")}
JOINS = {"aten::cat", "aten::stack", "aten::_cat"}
ADAM = {"aten::_fused_adam_"}
KINDS = {"matrix products": MATRIX_PRODUCTS, "copy_": COPIES, "elementwise": ELEMENTWISE,
         "reductions and softmax": REDUCTIONS, "cat and stack": JOINS, "fused Adam": ADAM}


def kind_of(name: str) -> str:
    """An operator's kind; a range our code names (the steps and evaluations) holds the Python between operators."""
    for kind, names in KINDS.items():
        if name in names:
            return kind
    return "Python between operators" if name.startswith("fusion.") else "other"


def profile_features(scale: float) -> dict:
    sizes = {split: max(30, round(MVSA_MULTI[split] * scale)) for split in ("train", "val")}
    return signal_features(sizes)


def head_configs(head: str, precision: str, epochs: int) -> list[FitConfig]:
    """The head's 48 configurations of the paper's grid, each training every one of `epochs` epochs."""
    base = FitConfig(head=head, precision=precision, epochs=epochs, patience=epochs)
    return grid_configs(base, heads=(head,))


def parameter_blocks(config: FitConfig, features: dict) -> int:
    """How many parameter tensors one model of `config` has (the stacked trainer steps them as as many blocks)."""
    return len(param_shapes(HEADS[config.head], *features["train"].dims, config.proj_dim, config.hidden))


def profile_training(features: dict, configs: list[FitConfig], counted_steps: int = 4) -> dict:
    """`train_many` under torch.profiler, after one untimed warm-up epoch: its seconds and self CPU seconds by
    operator over the whole run, and, from `counted_steps` steps profiled apart with their shapes, the copy_ calls
    inside a training step: of tensors, and of Python numbers (an operator given a float copies it into a 0-dim
    tensor: a few bytes, counted apart). Calls per step are the same in every step, and recording shapes holds
    memory per step, so the long run records none."""
    warm_up = [dataclasses.replace(config, epochs=1, patience=1) for config in configs]
    train_many(features, warm_up)
    rows = slice(0, counted_steps * configs[0].batch_size)
    few = {name: split.rows(rows) for name, split in features.items()}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        train_many(few, warm_up)
    steps, step_copies = 0, Counter()
    for event in profiler.events():
        if event.name == TRAIN_STEP:
            steps += 1
            step_copies.update("number" if child.input_shapes and child.input_shapes[0] == [] else "tensor"
                               for child in descendants(event) if child.name in COPIES)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        train_many(features, configs, on_epoch=HeapTrimmer())
        wall = time.perf_counter() - started
    seconds: Counter = Counter()
    calls: Counter = Counter()
    for event in profiler.events():
        seconds[event.name] += event.self_cpu_time_total / 1e6
        calls[event.name] += 1
    return {"seconds": seconds, "calls": calls, "steps": calls[TRAIN_STEP], "counted_steps": steps,
            "step_copies": step_copies, "wall": wall}


class HeapTrimmer:
    """An on_epoch callback that hands the heap's free memory back to the system once an epoch (glibc's
    malloc_trim; nothing elsewhere). The profiler's records, allocated between a step's tensors, fragment the heap,
    so that without it a profile of a few epochs holds tens of GB."""

    def __init__(self):
        import ctypes
        import ctypes.util

        self.epoch = 0
        self.trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)

    def __call__(self, epoch: int, index: int, metrics: dict) -> None:
        if epoch != self.epoch and self.trim is not None:
            self.epoch = epoch
            self.trim(0)


def descendants(event):
    stack = list(event.cpu_children)
    while stack:
        child = stack.pop()
        yield child
        stack.extend(child.cpu_children)


def summarise(measured: dict, blocks: int) -> dict:
    total = sum(measured["seconds"].values())
    by_kind: dict[str, float] = defaultdict(float)
    for name, spent in measured["seconds"].items():
        by_kind[kind_of(name)] += spent
    top = measured["seconds"].most_common(6)
    counted = max(1, measured["counted_steps"])
    return {"wall_seconds": round(measured["wall"], 2), "self_cpu_seconds": round(total, 2),
            "shares": {kind: round(spent / total, 3) for kind, spent in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "matrix_share": round(by_kind["matrix products"] / total, 3),
            "copy_share": round(by_kind["copy_"] / total, 3),
            "elementwise_share": round(by_kind["elementwise"] / total, 3),
            "steps": measured["steps"],
            "copy_calls_per_step": round(measured["step_copies"]["tensor"] / counted, 2),
            "number_copy_calls_per_step": round(measured["step_copies"]["number"] / counted, 2),
            "parameter_blocks": blocks,
            "top": [(name, round(spent / total, 3), measured["calls"][name]) for name, spent in top]}


def merged(parts: list[dict]) -> dict:
    return {key: sum((p[key] for p in parts), Counter()) for key in ("seconds", "calls", "step_copies")} | {
        key: sum(p[key] for p in parts) for key in ("steps", "counted_steps", "wall")}


def print_lines(precision: str, head: str, figures: dict) -> None:
    shares = ", ".join(f"{kind} {share:.1%}" for kind, share in figures["shares"].items())
    print(f"{precision} {head}: {figures['wall_seconds']:.1f} s profiled ({figures['steps']} steps); matrix products "
          f"{figures['matrix_share']:.1%} of self CPU time, copy_ {figures['copy_share']:.1%} "
          f"({figures['copy_calls_per_step']:g} calls per step of tensors, {figures['parameter_blocks']} parameter "
          f"blocks; {figures['number_copy_calls_per_step']:g} of Python numbers), elementwise "
          f"{figures['elementwise_share']:.1%}", flush=True)
    print(f"    by kind: {shares}")
    print("    costliest: " + ", ".join(f"{name} {share:.1%} ({count} calls)" for name, share, count in figures["top"]),
          flush=True)


def run_profile(features: dict, precisions: list[str], heads: list[str], epochs: int) -> dict:
    results: dict = {}
    for precision in precisions:
        results[precision], parts, blocks = {}, [], []
        for head in heads:
            configs = head_configs(head, precision, epochs)
            parts.append(profile_training(features, configs))
            blocks.append(parameter_blocks(configs[0], features))
            results[precision][head] = summarise(parts[-1], blocks[-1])
            print_lines(precision, head, results[precision][head])
        if len(heads) > 1:
            results[precision]["both"] = summarise(merged(parts), max(blocks))
            print_lines(precision, "both heads", results[precision]["both"])
    return results


def compile_check(features: dict, head: str, precision: str, steps: int = 5) -> dict:
    """torch.compile of the training step's forward and loss (its backward compiled with it) for the head's 48
    models at batch 256, against the same step eager: the compile's seconds, each step's, and after how many steps
    the compile pays back. One shape: another model count (models stop early, pruning drops them) or batch size
    (an epoch's last) compiles again."""
    configs = head_configs(head, precision, 1)
    spec, dtype, first = HEADS[head], head_dtype(precision), configs[0]
    shapes = param_shapes(spec, *features["train"].dims, first.proj_dim, first.hidden)
    stack = ParamStack.from_models(shapes, [init_params(shapes, c.head, c.seed) for c in configs],
                                   pieces=stacked_pieces(shapes))
    adam = BatchedAdam(stack, [c.lr for c in configs], compute_dtype=dtype, full_precision=FULL_PRECISION)
    batch = features["train"].rows(slice(0, first.batch_size))
    text, image = (Modality(m.tokens[:, :1].to(dtype), m.mask[:, :1]) for m in (batch.text, batch.image))
    rates = DropoutRates.of(torch.tensor([c.dropout for c in configs]), dtype)
    gammas = torch.tensor([c.focal_gamma for c in configs])
    generator = torch.Generator().manual_seed(0)
    noise = tuple(torch.rand(len(batch), d, generator=generator) for d in (fused_dim(spec, first.proj_dim),
                                                                              first.hidden))

    def losses(params):
        return focal_loss(head_forward(spec, params, text, image, rates, noise), batch.label, gammas)

    def step(forward) -> float:
        started = time.perf_counter()
        params = adam.params
        adam.step(torch.autograd.grad(forward(params).sum(), list(params.values()), materialize_grads=True))
        return time.perf_counter() - started

    step(losses)
    eager = min(step(losses) for _ in range(steps))
    compiled_losses = torch.compile(losses)
    try:
        compile_seconds = step(compiled_losses)
    except Exception as error:  # no C++ compiler, an unsupported op: say so, the eager path stands
        print(f"compile check: torch.compile failed: {str(error).splitlines()[0][:200]}", flush=True)
        return {"failed": str(error).splitlines()[0][:200]}
    compiled = min(step(compiled_losses) for _ in range(steps))
    saved = eager - compiled
    payback = math.ceil(compile_seconds / saved) if saved > 0 else None
    print(f"compile check ({precision} {head}, 48 models, batch {first.batch_size}): compiling took "
          f"{compile_seconds:.1f} s; a step takes {eager * 1e3:.0f} ms eager, {compiled * 1e3:.0f} ms compiled; "
          f"{'pays back after ' + str(payback) + ' steps of this shape' if payback else 'never pays back'}",
          flush=True)
    return {"head": head, "precision": precision, "compile_seconds": round(compile_seconds, 1),
            "eager_step_ms": round(eager * 1e3, 1), "compiled_step_ms": round(compiled * 1e3, 1),
            "payback_steps": payback}


def main(argv: list[str] | None = None) -> dict:
    parser = new_parser(__doc__)
    add_threads(parser, 2)
    parser.add_argument("--epochs", type=int, default=3, help="profiled epochs per head and precision [3]")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated, among fp32, bf16 [fp32,bf16]")
    parser.add_argument("--heads", default=",".join(PROFILED_HEADS), help="comma-separated [self_attn,dual_attn]")
    parser.add_argument("--scale", type=float, default=1.0, help="rows x SCALE (a quick look; printed)")
    parser.add_argument("--compile-check", action="store_true",
                        help="also time torch.compile of the first head's step in each precision (a minute or more)")
    args = parser.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    if not precisions or set(precisions) - set(HEAD_PRECISIONS) or not heads or set(heads) - set(HEADS):
        parser.error(f"--precisions among {', '.join(HEAD_PRECISIONS)}; --heads among {', '.join(HEADS)}")
    use_threads(args.threads)
    load = OtherLoad()
    features = profile_features(args.scale)
    rows = len(features["train"])
    print(f"threads {torch.get_num_threads()}; CPU bf16 units: {bf16_units()}; 48 configurations per head, batch "
          f"{FitConfig().batch_size}, {rows} training and {len(features['val'])} validation rows "
          f"({math.ceil(rows / FitConfig().batch_size)} steps an epoch), {args.epochs} epochs", flush=True)
    results = run_profile(features, precisions, heads, args.epochs)
    compiled = [compile_check(features, heads[0], precision) for precision in precisions] if args.compile_check else []
    others = load.cores()
    summary = {"profile": results, "compile_check": compiled, "epochs": args.epochs, "scale": args.scale,
               "bf16_units": bf16_units(), "threads": torch.get_num_threads(), "other_load_cores": round(others, 2)}
    return finish(summary, other_cores=others)


if __name__ == "__main__":
    main()
