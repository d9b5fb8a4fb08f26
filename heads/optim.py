"""The stacked optimiser: M models' parameters in one buffer (ParamStack) and Adam over it (BatchedAdam)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


class ParamStack:
    """M models' parameters in one flat buffer, parameter-major: parameter k of all models is one contiguous
    (M, *shape) block, so the shared first layer reshapes to (M*out, in) without a copy and Adam is a few ops on
    one tensor. `params` are leaf views of the buffer that require grad."""

    def __init__(self, shapes: dict[str, tuple], flat: Tensor, models: int):
        self.shapes, self.flat, self.models = shapes, flat, models
        self.params = {name: view.requires_grad_() for name, view in self.split(flat).items()}

    @classmethod
    def from_models(cls, shapes: dict[str, tuple], per_model: list[dict[str, Tensor]],
                    device: torch.device | str = "cpu") -> "ParamStack":
        flat = torch.cat([torch.stack([p[name] for p in per_model]).reshape(-1) for name in shapes])
        return cls(shapes, flat.to(device), len(per_model))

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """Views (M, *shape) into any buffer with this layout."""
        views, offset = {}, 0
        for name, shape in self.shapes.items():
            size = self.models * math.prod(shape)
            views[name] = flat[offset:offset + size].view(self.models, *shape)
            offset += size
        return views

    def per_model(self, values: Tensor) -> Tensor:
        """One value per model (M,) spread over the buffer layout."""
        return torch.cat([values.view(-1, 1).expand(-1, math.prod(shape)).reshape(-1)
                          for shape in self.shapes.values()])

    def select(self, flat: Tensor, keep: Tensor) -> Tensor:
        """The same layout holding only the models at positions `keep`."""
        return torch.cat([block[keep].reshape(-1) for block in self.split(flat).values()])


class BatchedAdam:
    """torch.optim.Adam with its defaults (betas 0.9/0.999, eps 1e-8, no weight decay, bias-corrected) over a
    ParamStack, with one learning rate per model. All models of a pass step together, so one step count serves.

    Where torch has its fused Adam kernel for the buffer's device (torch.optim.Adam(fused=True); on CPUs since torch
    2.4), one kernel call per run of neighbouring models that share a learning rate, over their rows of every
    parameter block: one pass over memory instead of ~9, and a handful of calls per step (the paper's grid orders a
    head's models by learning rate: 4 runs), each call a parallel region per block. Otherwise a vectorised update of
    the whole buffer with the learning rates spread per element. Both compute torch's formula.
    """

    def __init__(self, stack: ParamStack, lrs: list[float], betas=(0.9, 0.999), eps: float = 1e-8,
                 fused: bool | None = None):
        self.stack, self.lrs, self.betas, self.eps, self.steps = stack, list(lrs), betas, eps, 0
        self.fused = has_fused_adam(stack.flat.device.type) if fused is None else fused
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(stack.flat), torch.zeros_like(stack.flat)
        self._views()

    def _views(self) -> None:
        """Per-run lists of parameter/state blocks (fused path) or the per-element lr and work buffers."""
        if self.fused:
            # The fused kernels read the step from a tensor on the parameters' device (torch.optim.Adam's layout).
            self._step_count = torch.zeros((), device=self.stack.flat.device)
            self._runs = lr_runs(self.lrs)
            self._blocks = [list(self.stack.split(t).values()) for t in (self.stack.flat, self.exp_avg,
                                                                          self.exp_avg_sq)]
        else:
            lrs = torch.tensor(self.lrs, dtype=self.stack.flat.dtype, device=self.stack.flat.device)
            self._lr = self.stack.per_model(lrs)
            self._grad, self._work = torch.empty_like(self.stack.flat), torch.empty_like(self.stack.flat)

    @torch.no_grad()
    def step(self, grads: list[Tensor]) -> None:
        """grads: one (M, *shape) tensor per parameter, in the stack's order."""
        self.steps += 1
        if self.fused:
            self._fused_step(grads)
        else:
            self._vectorised_step(grads)

    def _fused_step(self, grads: list[Tensor]) -> None:
        # The CPU kernel reads each tensor's memory as if contiguous: the gradient of a weight used transposed
        # (stacked_linear's bmm) has transposed strides and would be applied to the wrong elements. CUDA's
        # multi-tensor kernels want dense tensors too.
        grads = [grad.contiguous() for grad in grads]
        self._step_count.fill_(self.steps)
        params, exp_avgs, exp_avg_sqs = self._blocks
        for first, end, lr in self._runs:
            rows = slice(first, end)
            torch._fused_adam_([p[rows] for p in params], [g[rows] for g in grads], [m[rows] for m in exp_avgs],
                               [v[rows] for v in exp_avg_sqs], [], [self._step_count] * len(grads), lr=lr,
                               beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0, eps=self.eps,
                               amsgrad=False, maximize=False)

    def _vectorised_step(self, grads: list[Tensor]) -> None:
        grad, work = self._grad, self._work  # preallocated: fresh multi-MB temporaries every step cost page faults
        torch.cat([g.reshape(-1) for g in grads], out=grad)
        beta1, beta2 = self.betas
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # The floor only avoids sqrt(0), which is ~5x slower than other inputs on this CPU; sqrt(1e-36) = 1e-18 is
        # lost when eps (1e-8) is added, so denom is what torch computes.
        torch.clamp_min(self.exp_avg_sq, 1e-36, out=work).sqrt_()
        work.div_(math.sqrt(1 - beta2 ** self.steps)).add_(self.eps)
        torch.div(self.exp_avg, work, out=work)
        # param -= lr / (1 - beta1^t) * exp_avg / denom, as torch.optim.Adam, with lr per element (= per model)
        self.stack.flat.addcmul_(work, self._lr, value=-1 / (1 - beta1 ** self.steps))

    def keep(self, keep: Tensor) -> "BatchedAdam":
        """An optimizer for the models at positions `keep` only, their state carried over."""
        stack = ParamStack(self.stack.shapes, self.stack.select(self.stack.flat.detach(), keep), len(keep))
        kept = BatchedAdam.__new__(BatchedAdam)
        kept.stack, kept.lrs, kept.betas, kept.eps, kept.steps = (stack, [self.lrs[i] for i in keep.tolist()],
                                                                  self.betas, self.eps, self.steps)
        kept.fused = self.fused
        kept.exp_avg, kept.exp_avg_sq = (self.stack.select(t, keep) for t in (self.exp_avg, self.exp_avg_sq))
        kept._views()
        return kept


def lr_runs(lrs: list[float]) -> list[tuple[int, int, float]]:
    """(first, end, lr) of each run of neighbouring models with the same learning rate."""
    runs: list[tuple[int, int, float]] = []
    for position, lr in enumerate(lrs):
        if runs and runs[-1][2] == lr:
            runs[-1] = (runs[-1][0], position + 1, lr)
        else:
            runs.append((position, position + 1, lr))
    return runs


@functools.cache
def has_fused_adam(device_type: str) -> bool:
    """Whether torch has its fused Adam kernel for this device type (CPU: since torch 2.4); probed once on a tiny
    tensor there."""
    try:
        tensors = [[torch.zeros(1, device=device_type)] for _ in range(4)]
        torch._fused_adam_(*tensors, [], [torch.ones((), device=device_type)], lr=1e-3, beta1=0.9, beta2=0.999,
                           weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
        return True
    except (AttributeError, AssertionError, RuntimeError, NotImplementedError):  # no kernel, or no such device
        return False
