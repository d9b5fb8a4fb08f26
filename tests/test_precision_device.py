"""Devices and precision for the heads: the stacked optimiser, autocast bf16, device-generic training, the CLI options."""

from dataclasses import replace

import pytest
import torch

import fusion.heads.device as device_module
import fusion.heads.optim as optim
from fusion.errors import FusionError
from fusion.heads.config import FitConfig, config_from_dict
from fusion.heads.device import autocast, check_precision, resolve_device
from fusion.heads.optim import BatchedAdam, ParamStack, lr_runs
from fusion.heads.train import train_head, train_many
from synthetic import gaussian_features, xor_features

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(proj_dim=32, hidden=32, batch_size=64)
SMALL_SIZES = {"train": 300, "val": 100, "test": 100}


@pytest.mark.parametrize("fused", [True, False])
def test_batched_adam_follows_torch_adam_with_transposed_gradients_and_shared_learning_rates(fused):
    """Autograd hands back transposed (non-contiguous) gradients for weights used as W^T in a batched matmul; the
    fused kernel reads memory in order, so they must be made dense first. Neighbouring models share learning rates,
    as a head's models do in the paper's grid, so the fused path steps several models per call."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 3), "b": (5,)}
    models = [{name: torch.randn(shape, generator=generator) for name, shape in shapes.items()} for _ in range(4)]
    lrs = [1e-2, 1e-2, 0.3, 1e-3]
    optimizer = BatchedAdam(ParamStack.from_models(shapes, models), lrs, fused=fused)
    references = [{k: v.clone().requires_grad_() for k, v in m.items()} for m in models]
    torch_adams = [torch.optim.Adam(list(r.values()), lr=lr) for r, lr in zip(references, lrs)]
    for _ in range(10):
        grads = [torch.randn(4, 3, 4, generator=generator).transpose(1, 2), torch.randn(4, 5, generator=generator)]
        assert not grads[0].is_contiguous()
        optimizer.step(grads)
        for m, (reference, adam) in enumerate(zip(references, torch_adams)):
            for grad, param in zip(grads, reference.values()):
                param.grad = grad[m].clone()
            adam.step()
    for m, reference in enumerate(references):
        for name, param in reference.items():
            torch.testing.assert_close(optimizer.stack.params[name][m], param.detach(), rtol=1e-5, atol=1e-6)


def test_lr_runs_group_neighbours_only():
    assert lr_runs([1e-2, 1e-2, 1e-3, 1e-2]) == [(0, 2, 1e-2), (2, 3, 1e-3), (3, 4, 1e-2)]
    assert lr_runs([]) == []


def test_fused_and_vectorised_optimisers_train_alike(monkeypatch):
    """The whole trainer with either Adam path: the same trajectories up to float rounding (lr 1e-3: not chaotic)."""
    features = xor_features(SMALL_SIZES)
    configs = [FitConfig(head=h, lr=1e-3, dropout=0.0, epochs=3, **FAST) for h in ("self_attn", "dual_attn")]
    fused = train_many(features, configs)
    monkeypatch.setattr(optim, "has_fused_adam", lambda device_type: False)
    vectorised = train_many(features, configs)
    for first, second in zip(fused, vectorised):
        for name, tensor in first.state_dict.items():
            torch.testing.assert_close(tensor, second.state_dict[name], rtol=1e-4, atol=1e-5)
