"""dual_attn training on token sequences at the real shapes: the feature-space attention (heads/layers.py
token_cross_attention) against the pooled path and the direct formula (every token projected), in one run.

    .venv/bin/python -m fusion.benchmarks.token_speed               # a few minutes on 2 idle cores
    .venv/bin/python -m fusion.benchmarks.token_speed --rows 4096   # more rows per epoch (~1.2 GB per 1024 rows)

Shapes: text 128 x 768 (BERT-base tokens; tweet-like lengths, the rest padding), image 257 x 384 (DINOv2-small's CLS
and 256 patches), 12 stacked dual_attn models (proj 256, hidden 256), batch 256, float32. The rows are random
features in memory (MVSA-Multi has ~17k; the epoch here has --rows, default 1024, so 4 minibatches: per-minibatch
cost does not depend on the row count). A training epoch is what the trainer does per minibatch: gather the rows,
forward, loss, backward, one Adam step for every model; evaluation is not included.

- token_vs_pooled_epoch: seconds of an epoch on the token sequences over an epoch of the same models, rows and batch
  on the pooled features (token 0 of each modality, where dual_attn is the single-key variant). Each is timed after
  a warm-up step, alternating, --repeats times; the fastest counts.
- speedup_vs_direct: seconds per training step of the direct formula (every token projected by every model, then
  softmax attention: the path before feature-space attention) over the token path's seconds per step. The direct
  formula is slow, so it is timed on --direct-batches minibatches after a warm-up (the agreement check below, on a
  quarter minibatch), and compared per step; it runs --direct-chunk models per forward and backward (all models in
  one would need ~7 GB; the models are independent, so this changes the memory, not the work).
- max_abs_diff_vs_direct: the largest |logit difference| between the two formulas, same weights and rows;
  max_rel_grad_diff_vs_direct: the largest |gradient difference| over the largest |gradient|, over all parameters.
- token_of_limit, pooled_of_limit: each path's matrix-product FLOPs per training step (step_flops) over the peak
  fp32 GEMM rate (common.py gemm_rate, before and after the timings), over its seconds per step.
The *_cpu figures are the same ratios in CPU seconds of this process, which time-slicing with other work on a
shared machine disturbs less (threads that spin while waiting for a descheduled sibling still count).
The last line printed is one JSON object.
"""

from __future__ import annotations

import resource
import time

import torch
import torch.nn.functional as F

from fusion.benchmarks.common import (IMAGE_DIM, PATCHES, TEXT_DIM, TEXT_LENGTH, OtherLoad, add_repeats, add_threads,
                                      finish, gemm_rate, new_parser, use_threads)
from fusion.device import bf16_units
from fusion.heads.features import Modality, SplitFeatures
from fusion.heads.layers import shared_linear, stacked_linear
from fusion.heads.losses import cross_entropy
from fusion.heads.models import head_forward, init_params, param_shapes
from fusion.heads.optim import BatchedAdam, ParamStack
from fusion.heads.registry import HEADS

DUAL = HEADS["dual_attn"]


def token_rows(rows: int, seed: int) -> SplitFeatures:
    """Random features shaped like a --tokens cache as training holds it: token 0 is the pooled embedding."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(rows, TEXT_LENGTH, TEXT_DIM, generator=generator)
    lengths = torch.randint(8, 61, (rows,), generator=generator)  # tweets: most are far shorter than 128 tokens
    text_mask = torch.arange(TEXT_LENGTH) < lengths.unsqueeze(1)
    image = torch.randn(rows, PATCHES, IMAGE_DIM, generator=generator)
    label = torch.randint(0, 3, (rows,), generator=generator)
    return SplitFeatures(Modality(text, text_mask), Modality(image, torch.ones(rows, PATCHES, dtype=torch.bool)),
                         label)


# ------------------------------------------------------------------ the direct formula

def direct_logits(params: dict, text: Modality, image: Modality) -> torch.Tensor:
    """dual_attn as written in the paper: every token projected (Eqs. 1, 4), then Q/K/V and softmax attention."""
    h = shared_linear(text.tokens, params["text_proj.weight"], params["text_proj.bias"])  # (M, B, L, d)
    g = shared_linear(image.tokens, params["image_proj.weight"], params["image_proj.bias"])
    text_qkv, image_qkv = params["cross.text_qkv.weight"], params["cross.image_qkv.weight"]
    dim = h.shape[-1]
    text_adjusted = direct_cross(h[:, :, 0], text_qkv[:, :dim], g, image_qkv[:, dim:], image.mask)
    image_adjusted = direct_cross(g[:, :, 0], image_qkv[:, :dim], h, text_qkv[:, dim:], text.mask)
    fused = direct_pair_attention(text_adjusted, image_adjusted, params["fusion.qkv.weight"])
    hidden = torch.relu(stacked_linear(fused, params["classifier.hidden.weight"], params["classifier.hidden.bias"]))
    return stacked_linear(hidden, params["classifier.out.weight"], params["classifier.out.bias"])


def direct_cross(latent, query_weight, others, key_value_weight, mask):
    models, batch, length, dim = others.shape
    query = stacked_linear(latent, query_weight).unsqueeze(2)
    key_value = stacked_linear(others.reshape(models, batch * length, dim), key_value_weight)
    key, value = key_value.view(models, batch, length, 2 * dim).split(dim, dim=-1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask.unsqueeze(-2)).squeeze(2)


def direct_pair_attention(first, second, qkv_weight):
    """Eq. 7 over [first, second] with Q, K and V of both tokens and a softmax."""
    models, batch, dim = first.shape
    sequence = torch.stack((first, second), dim=2).reshape(models, batch * 2, dim)
    query, key, value = stacked_linear(sequence, qkv_weight).view(models, batch, 2, 3 * dim).split(dim, dim=-1)
    return F.scaled_dot_product_attention(query, key, value).reshape(models, batch, 2 * dim)


def step_flops(batch: int, models: int, proj: int, hidden: int, tokens: bool) -> int:
    """Matrix-product FLOPs of one training step of dual_attn as heads/models.py computes it, on the token sequences
    (all TEXT_LENGTH and PATCHES positions, padding included) or on the pooled features. A product of two learned
    sides costs twice its forward again in the backward pass; one with a feature side (the tokens, the first layer's
    inputs) once, as that side needs no gradient."""
    d, dims, lengths = proj, (TEXT_DIM, IMAGE_DIM), (TEXT_LENGTH, PATCHES)
    with_features = 2 * sum(dims) * d  # the two latents (the first layer)
    learned = 2 * 2 * d * d + 4 * 2 * d * d + 2 * 2 * d * hidden + 2 * hidden * 3  # values, pair attention, MLP
    if tokens:  # per direction: W_Q and W_K on the query, P to the feature space and back; scores and weighted mean
        learned += sum(2 * 2 * d * d + 2 * 2 * d * dim for dim in dims)
        with_features += sum(2 * 2 * length * dim for length, dim in zip(lengths, dims))
    return batch * models * (3 * learned + 2 * with_features)


# ------------------------------------------------------------------ training steps

def fast_logits(params, text, image):
    return head_forward(DUAL, params, text, image)


def stacked_params(models: int, proj_dim: int, hidden: int) -> ParamStack:
    shapes = param_shapes(DUAL, TEXT_DIM, IMAGE_DIM, proj_dim, hidden)
    return ParamStack.from_models(shapes, [init_params(shapes, "dual_attn", seed) for seed in range(models)])


def logits_and_grads(forward, params: dict, batch: SplitFeatures, chunk: int) -> tuple[torch.Tensor, list]:
    """Logits (M, B, 3) and the summed cross-entropy's gradients of all M models, `chunk` models per forward and
    backward (the models are independent, so chunking changes the memory, not the work or the result)."""
    names, models = list(params), next(iter(params.values())).shape[0]
    if chunk >= models:  # as the trainer does it
        logits = forward(params, batch.text, batch.image)
        return logits.detach(), torch.autograd.grad(cross_entropy(logits, batch.label).sum(), list(params.values()),
                                                    allow_unused=True, materialize_grads=True)
    logits, grads = [], [torch.zeros_like(p) for p in params.values()]
    for start in range(0, models, chunk):
        part = {name: params[name][start:start + chunk] for name in names}
        chunk_logits = forward(part, batch.text, batch.image)
        chunk_grads = torch.autograd.grad(cross_entropy(chunk_logits, batch.label).sum(), list(part.values()),
                                          allow_unused=True, materialize_grads=True)
        for total, grad in zip(grads, chunk_grads):
            total[start:start + chunk] += grad
        logits.append(chunk_logits.detach())
    return torch.cat(logits), grads


class Trainer:
    """M models with the trainer's stacked parameters and Adam; `forward` maps (params, text, image) to logits."""

    def __init__(self, forward, models: int, proj_dim: int, hidden: int, chunk: int | None = None):
        self.forward, self.chunk = forward, chunk or models
        self.adam = BatchedAdam(stacked_params(models, proj_dim, hidden), [1e-4] * models)

    def step(self, batch: SplitFeatures) -> None:
        self.adam.step(logits_and_grads(self.forward, self.adam.stack.params, batch, self.chunk)[1])

    def seconds(self, split: SplitFeatures, batch_size: int, batches: int | None = None) -> tuple[float, float, int]:
        """Wall and CPU seconds of `batches` training steps (default: one epoch) over shuffled rows, and the steps."""
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
        starts = list(range(0, len(split), batch_size))[:batches]
        started, cpu = time.perf_counter(), time.process_time()
        for start in starts:
            self.step(split.rows(order[start:start + batch_size]))
        return time.perf_counter() - started, time.process_time() - cpu, len(starts)


def agreement(batch: SplitFeatures, params: dict, direct_chunk: int) -> tuple[float, float]:
    """Max |logit difference| and max |gradient difference| / max |gradient| of the two formulas, one minibatch."""
    fast, fast_grads = logits_and_grads(fast_logits, params, batch, len(next(iter(params.values()))))
    direct, direct_grads = logits_and_grads(direct_logits, params, batch, direct_chunk)
    relative = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(fast_grads, direct_grads))
    return float((fast - direct).abs().max()), relative


def parse_args(argv: list[str] | None = None):
    parser = new_parser(__doc__)
    parser.add_argument("--rows", type=int, default=1024, help="training rows per epoch")
    parser.add_argument("--models", type=int, default=12, help="stacked dual_attn models")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    add_repeats(parser, 2, help="alternating timed epochs of each path")
    parser.add_argument("--direct-batches", type=int, default=1, help="timed steps of the direct formula")
    parser.add_argument("--direct-chunk", type=int, default=4, help="models per forward of the direct formula")
    add_threads(parser, None)
    return parser.parse_args(argv)


def time_epochs(args, dims: tuple[int, int, int], tokens: SplitFeatures) -> tuple[dict, dict]:
    """The fastest epoch of the token and the pooled path (wall and CPU seconds), and their steps per epoch."""
    paths = {"token": (Trainer(fast_logits, *dims), tokens), "pooled": (Trainer(fast_logits, *dims),
                                                                        tokens.latents_only())}
    best, cpu, steps = {name: float("inf") for name in paths}, {name: float("inf") for name in paths}, {}
    for trainer, split in paths.values():
        trainer.seconds(split, args.batch_size, batches=1)  # warm-up
    for repeat in range(args.repeats):
        for name, (trainer, split) in paths.items():
            seconds, cpu_seconds, steps[name] = trainer.seconds(split, args.batch_size)
            best[name], cpu[name] = min(best[name], seconds), min(cpu[name], cpu_seconds)
            print(f"epoch {repeat + 1}, {name}: {seconds:.2f} s ({cpu_seconds:.2f} CPU s, {steps[name]} steps)",
                  flush=True)
    return best, cpu, steps


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    use_threads(args.threads)
    load = OtherLoad()
    print(f"shapes: text {TEXT_LENGTH}x{TEXT_DIM}, image {PATCHES}x{IMAGE_DIM}, {args.models} stacked models, batch "
          f"{args.batch_size}, {args.rows} rows per epoch (MVSA-Multi has ~17k), float32", flush=True)
    tokens = token_rows(args.rows, seed=0)
    rates = [gemm_rate(torch.float32)]
    dims = (args.models, args.proj_dim, args.hidden)
    # Differences are per row, so a quarter minibatch shows them; it also warms the direct formula up.
    max_diff, grad_diff = agreement(tokens.rows(slice(0, args.batch_size // 4)), stacked_params(*dims).params,
                                    args.direct_chunk)
    print(f"direct vs token path on {args.batch_size // 4} rows: max |logit diff| {max_diff:.2e}, max relative "
          f"gradient diff {grad_diff:.2e}", flush=True)
    best, cpu, steps = time_epochs(args, dims, tokens)
    direct_seconds, direct_cpu, direct_steps = Trainer(direct_logits, *dims, chunk=args.direct_chunk).seconds(
        tokens, args.batch_size, batches=args.direct_batches)
    token_step, direct_step = best["token"] / steps["token"], direct_seconds / direct_steps
    print(f"per step: token path {token_step:.3f} s, pooled {best['pooled'] / steps['pooled']:.3f} s, direct "
          f"formula {direct_step:.2f} s (timed on {direct_steps} step(s) after a warm-up, {args.direct_chunk} "
          f"models per forward and backward to bound its memory, compared per step; a direct epoch of "
          f"{steps['token']} steps would take ~{direct_step * steps['token']:.0f} s)", flush=True)
    rates.append(gemm_rate(torch.float32))
    of_limit = {path: step_flops(args.batch_size, args.models, args.proj_dim, args.hidden, path == "token")
                / max(rates) / (best[path] / steps[path]) for path in ("token", "pooled")}
    print(f"of limit (matrix-product FLOPs per step over the peak fp32 GEMM rate, {max(rates) / 1e9:.1f} GFLOP/s; "
          f"measured twice, from {min(rates) / 1e9:.1f}): token path {of_limit['token']:.1%}, pooled "
          f"{of_limit['pooled']:.1%}", flush=True)
    peak, others = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, load.cores()
    print(f"peak RSS {peak / 2**30:.2f} GiB", flush=True)
    summary = {"token_vs_pooled_epoch": round(best["token"] / best["pooled"], 3),
               "speedup_vs_direct": round(direct_step / token_step, 1),
               "max_abs_diff_vs_direct": float(f"{max_diff:.3g}"),
               "max_rel_grad_diff_vs_direct": float(f"{grad_diff:.3g}"),
               "token_vs_pooled_epoch_cpu": round(cpu["token"] / cpu["pooled"], 3),
               "speedup_vs_direct_cpu": round(direct_cpu / direct_steps / (cpu["token"] / steps["token"]), 1),
               "token_epoch_s": round(best["token"], 3), "pooled_epoch_s": round(best["pooled"], 3),
               "token_of_limit": round(of_limit["token"], 3), "pooled_of_limit": round(of_limit["pooled"], 3),
               "token_step_s": round(token_step, 4), "direct_step_s": round(direct_step, 3),
               "steps_per_epoch": steps["token"], "rows": args.rows, "models": args.models,
               "batch_size": args.batch_size, "direct_steps_timed": direct_steps,
               "direct_models_per_forward": args.direct_chunk, "threads": torch.get_num_threads(),
               "bf16_units": bf16_units(), "other_load_cores": round(others, 2),
               "peak_rss_gib": round(peak / 2**30, 2)}
    return finish(summary, other_cores=others)


if __name__ == "__main__":
    main()
