"""The stacked optimiser: M models' parameters in one buffer (ParamStack) and Adam over it (BatchedAdam)."""

from __future__ import annotations

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
    def from_models(cls, shapes: dict[str, tuple], per_model: list[dict[str, Tensor]]) -> "ParamStack":
        flat = torch.cat([torch.stack([p[name] for p in per_model]).reshape(-1) for name in shapes])
        return cls(shapes, flat, len(per_model))

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

    Where torch has its fused CPU Adam kernel (torch.optim.Adam(fused=True)), each model is one kernel call over its
    own parameter blocks with its own lr (one pass over memory instead of ~9); otherwise a vectorised update of the
    whole buffer with the learning rates spread per element. Both compute torch's formula.
    """

    def __init__(self, stack: ParamStack, lrs: list[float], betas=(0.9, 0.999), eps: float = 1e-8,
                 fused: bool | None = None):
        self.stack, self.lrs, self.betas, self.eps, self.steps = stack, list(lrs), betas, eps, 0
        self.fused = _HAS_FUSED_ADAM if fused is None else fused
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(stack.flat), torch.zeros_like(stack.flat)
        self._views()

    def _views(self) -> None:
        """Per-model lists of parameter/state blocks (fused path) or the per-element lr and work buffers."""
        if self.fused:
            self._step_count = torch.zeros(())
            self._per_model = [[list(block[m] for block in self.stack.split(t).values()) for m in range(len(self.lrs))]
                               for t in (self.stack.flat, self.exp_avg, self.exp_avg_sq)]
        else:
            self._lr = self.stack.per_model(torch.tensor(self.lrs, dtype=self.stack.flat.dtype))
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
        # The fused kernel reads each tensor's memory as if contiguous: the gradient of a weight used transposed
        # (stacked_linear's bmm) has transposed strides and would be applied to the wrong elements.
        grads = [grad.contiguous() for grad in grads]
        self._step_count.fill_(self.steps)
        params, exp_avgs, exp_avg_sqs = self._per_model
        for model, lr in enumerate(self.lrs):
            torch._fused_adam_(params[model], [g[model] for g in grads], exp_avgs[model], exp_avg_sqs[model], [],
                               [self._step_count] * len(grads), lr=lr, beta1=self.betas[0], beta2=self.betas[1],
                               weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)

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


def _has_fused_adam() -> bool:
    """torch's fused Adam kernel runs on CPU since torch 2.4; probe it once on a tiny tensor."""
    try:
        tensors = [[torch.zeros(1)] for _ in range(4)]
        torch._fused_adam_(*tensors, [], [torch.ones(())], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0,
                           eps=1e-8, amsgrad=False, maximize=False)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_HAS_FUSED_ADAM = _has_fused_adam()
