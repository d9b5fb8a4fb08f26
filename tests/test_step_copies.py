"""What a training step copies (benchmarks/step_profile.py counts it): in bf16, each gradient cast to fp32 once, the
weights to bf16 once and the logits once each way, and no layout change; in fp32, only the logits' few values. And
the optimiser that makes it so: Q, K and V stacked piece by piece, and a bf16 copy of the weights refreshed after
every step, still step like torch.optim.Adam.

Calls per step do not depend on the machine, so this holds where bf16 is emulated too."""

from __future__ import annotations

import pytest
import torch

from fusion.benchmarks.step_profile import parameter_blocks, profile_training, summarise
from fusion.heads.config import FitConfig
from fusion.heads.optim import BatchedAdam, ParamStack
from fusion.heads.search.configs import grid_configs
from synthetic import xor_features

pytestmark = pytest.mark.usefixtures("one_thread")


def step_figures(head: str, precision: str) -> dict:
    # Sizes where every product goes to the library's matrix kernels (tiny ones are computed in place), which copy
    # any operand that is not dense in bf16.
    features = xor_features({"train": 256, "val": 64}, text_dim=48, image_dim=24)
    base = FitConfig(head=head, precision=precision, epochs=1, patience=1, proj_dim=32, hidden=32, batch_size=64)
    configs = grid_configs(base, heads=(head,), lrs=(1e-3, 1e-4), dropouts=(0.0, 0.3), losses=("ce", "focal2"))
    return summarise(profile_training(features, configs), parameter_blocks(base, features))


@pytest.mark.parametrize("head", ["self_attn", "dual_attn"])
def test_a_bf16_step_casts_each_gradient_the_weights_and_the_logits_once_and_copies_nothing_else(head):
    figures = step_figures(head, "bf16")
    blocks = figures["parameter_blocks"]
    assert figures["steps"] == 4
    # blocks - 1 gradients (the output bias is fp32 throughout), the weights, the logits forward and backward
    assert figures["copy_calls_per_step"] == blocks + 2


def test_an_fp32_step_copies_only_the_logits():
    figures = step_figures("self_attn", "fp32")
    assert figures["steps"] == 4 and figures["copy_calls_per_step"] == 1


@pytest.mark.parametrize("fused", [True, False])
def test_a_stack_by_pieces_with_a_bf16_copy_steps_like_torch_adam(fused):
    generator = torch.Generator().manual_seed(0)
    shapes = {"qkv": (6, 2), "bias": (3,)}
    models = [{name: torch.randn(shape, generator=generator) for name, shape in shapes.items()} for _ in range(4)]
    lrs = [1e-2, 1e-2, 0.1, 1e-3]
    stack = ParamStack.from_models(shapes, models, pieces={"qkv": 3})
    adam = BatchedAdam(stack, lrs, fused=fused, compute_dtype=torch.bfloat16, full_precision=("bias",))
    qkv = adam.params["qkv"]
    assert qkv.shape == (3, 4, 2, 2) and qkv.dtype == torch.bfloat16 and qkv.is_contiguous()
    assert torch.equal(qkv[1, 2], models[2]["qkv"][2:4].bfloat16())  # W_K of model 2
    assert adam.params["bias"].dtype == torch.float32
    references = [{name: tensor.clone().requires_grad_() for name, tensor in m.items()} for m in models]
    torch_adams = [torch.optim.Adam(list(r.values()), lr=lr) for r, lr in zip(references, lrs)]
    for _ in range(5):
        qkv_grads = torch.randn(4, 6, 2, generator=generator).bfloat16()  # (M, 6, 2), as a bf16 forward gives them
        bias_grads = torch.randn(4, 3, generator=generator)
        adam.step([qkv_grads.unflatten(1, (3, 2)).transpose(0, 1).contiguous(), bias_grads])
        for m, (reference, torch_adam) in enumerate(zip(references, torch_adams)):
            reference["qkv"].grad, reference["bias"].grad = qkv_grads[m].float(), bias_grads[m].clone()
            torch_adam.step()
    for m, reference in enumerate(references):
        for name, param in reference.items():
            torch.testing.assert_close(stack.of_model(name, stack.params[name], m), param.detach())
    assert torch.equal(adam.params["qkv"], stack.params["qkv"].detach().bfloat16())  # refreshed after each step
    kept = adam.keep(torch.tensor([1, 3]))
    for position, model in enumerate((1, 3)):
        for name in shapes:
            assert torch.equal(kept.stack.of_model(name, kept.stack.params[name], position),
                               stack.of_model(name, stack.params[name], model))
    assert torch.equal(kept.params["qkv"], kept.stack.params["qkv"].detach().bfloat16())
