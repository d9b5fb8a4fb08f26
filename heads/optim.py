"""The stacked optimiser: M models' parameters in one buffer (ParamStack) and Adam over it (BatchedAdam)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


class ParamStack:
    """M models' parameters in one flat buffer, parameter-major: parameter k of all models is one contiguous
    (M, *shape) block, so the shared first layer reshapes to (M*out, in) without a copy and Adam is a few ops on
    one tensor. A parameter named in `pieces` (with how many) is stacked piece by piece instead, (pieces, M,
    rows / pieces, *rest): a [W_Q; W_K; W_V] weight whose pieces are separate operands, each then dense for all
    models (a bf16 matrix kernel copies any operand that is not). `params` are leaf views of the buffer that require
    grad."""

    def __init__(self, shapes: dict[str, tuple], flat: Tensor, models: int, pieces: dict[str, int] | None = None):
        self.shapes, self.flat, self.models, self.pieces = shapes, flat, models, dict(pieces or {})
        self.params = {name: view.requires_grad_() for name, view in self.split(flat).items()}

    @classmethod
    def from_models(cls, shapes: dict[str, tuple], per_model: list[dict[str, Tensor]],
                    device: torch.device | str = "cpu", pieces: dict[str, int] | None = None) -> "ParamStack":
        pieces = dict(pieces or {})
        blocks = []
        for name in shapes:
            block = torch.stack([p[name] for p in per_model])  # (M, *shape)
            if name in pieces:
                block = block.unflatten(1, (pieces[name], -1)).transpose(0, 1)
            blocks.append(block.reshape(-1))
        return cls(shapes, torch.cat(blocks).to(device), len(per_model), pieces)

    def stacked_shape(self, name: str) -> tuple:
        shape, pieces = self.shapes[name], self.pieces.get(name)
        return (self.models, *shape) if pieces is None else (pieces, self.models, shape[0] // pieces, *shape[1:])

    def model_dim(self, name: str) -> int:
        """Where a block's model dimension is: 0, or 1 for a parameter stacked piece by piece."""
        return 1 if name in self.pieces else 0

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """Views (stacked_shape) into any buffer with this layout."""
        views, offset = {}, 0
        for name in self.shapes:
            shape = self.stacked_shape(name)
            size = math.prod(shape)
            views[name] = flat[offset:offset + size].view(shape)
            offset += size
        return views

    def model_blocks(self, tensors: list[Tensor]) -> list[Tensor]:
        """One tensor per parameter (stacked_shape, in the stack's order) -> blocks whose first dimension is the
        model: a parameter stacked piece by piece gives one per piece."""
        blocks: list[Tensor] = []
        for name, tensor in zip(self.shapes, tensors):
            blocks.extend(tensor.unbind(0) if name in self.pieces else [tensor])
        return blocks

    def of_model(self, name: str, stacked: Tensor, position: int) -> Tensor:
        """Model `position`'s parameter, in its own shape, from a stacked tensor of this layout."""
        return stacked.select(self.model_dim(name), position).reshape(self.shapes[name])

    def per_model(self, values: Tensor) -> Tensor:
        """One value per model (M,) spread over the buffer layout."""
        return torch.cat([values.view(1, -1, 1).expand(self.pieces.get(name, 1), -1,
                                                       math.prod(shape) // self.pieces.get(name, 1)).reshape(-1)
                          for name, shape in self.shapes.items()])

    def select(self, flat: Tensor, keep: Tensor) -> Tensor:
        """The same layout holding only the models at positions `keep`."""
        return torch.cat([block.index_select(self.model_dim(name), keep).reshape(-1)
                          for name, block in self.split(flat).items()])


class BatchedAdam:
    """torch.optim.Adam with its defaults (betas 0.9/0.999, eps 1e-8, no weight decay, bias-corrected) over a
    ParamStack, with one learning rate per model. All models of a pass step together, so one step count serves.

    Where torch has its fused Adam kernel for the buffer's device (torch.optim.Adam(fused=True); on CPUs since torch
    2.4), one kernel call per run of neighbouring models that share a learning rate, over their rows of every
    parameter block: one pass over memory instead of ~9, and a handful of calls per step (the paper's grid orders a
    head's models by learning rate: 4 runs), each call a parallel region per block. Otherwise a vectorised update of
    the whole buffer with the learning rates spread per element. Both compute torch's formula.

    `params` are the weights the forward pass multiplies. In the stack's own dtype they are its leaf views. With a
    narrower `compute_dtype` (bf16) they are views of a copy of the buffer in that dtype, refreshed by one copy
    after each step (rather than a cast per product, as autocast does), except the `full_precision` ones, which stay
    the stack's own; the gradients are cast into an fp32 buffer, one copy per parameter block, so the weights, Adam's
    state and its arithmetic stay fp32.
    """

    def __init__(self, stack: ParamStack, lrs: list[float], betas=(0.9, 0.999), eps: float = 1e-8,
                 fused: bool | None = None, compute_dtype: torch.dtype | None = None,
                 full_precision: tuple[str, ...] = ()):
        self.stack, self.lrs, self.betas, self.eps, self.steps = stack, list(lrs), betas, eps, 0
        self.fused = has_fused_adam(stack.flat.device.type) if fused is None else fused
        self.compute_dtype = stack.flat.dtype if compute_dtype is None else compute_dtype
        self.full_precision = tuple(full_precision)
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(stack.flat), torch.zeros_like(stack.flat)
        self._views()

    def _views(self) -> None:
        """Per-run lists of parameter/state blocks (fused path) or the per-element lr and work buffers, and the
        compute-dtype weights."""
        flat = self.stack.flat
        if self.fused:
            # The fused kernels read the step from a tensor on the parameters' device (torch.optim.Adam's layout).
            self._step_count = torch.zeros((), device=flat.device)
            self._runs = lr_runs(self.lrs)
            self._blocks = [self.stack.model_blocks(list(self.stack.split(t).values()))
                            for t in (flat, self.exp_avg, self.exp_avg_sq)]
        else:
            lrs = torch.tensor(self.lrs, dtype=flat.dtype, device=flat.device)
            self._lr = self.stack.per_model(lrs)
            self._grad, self._work = torch.empty_like(flat), torch.empty_like(flat)
        if self.compute_dtype == flat.dtype:
            self.params, self._shadow = self.stack.params, None
        else:
            self._shadow = flat.detach().to(self.compute_dtype)
            self.params = {name: self.stack.params[name] if name in self.full_precision else view.requires_grad_()
                           for name, view in self.stack.split(self._shadow).items()}
            self._grad_views = list(self.stack.split(torch.empty_like(flat)).values())

    @torch.no_grad()
    def step(self, grads: list[Tensor]) -> None:
        """grads: one tensor per parameter of `params` (ParamStack.stacked_shape), in the stack's order."""
        self.steps += 1
        if self._shadow is not None:
            grads = [grad if grad.dtype == view.dtype else view.copy_(grad)
                     for view, grad in zip(self._grad_views, grads)]
        if self.fused:
            self._fused_step(grads)
        else:
            self._vectorised_step(grads)
        if self._shadow is not None:
            self._shadow.copy_(self.stack.flat)

    def _fused_step(self, grads: list[Tensor]) -> None:
        # The CPU kernel reads each tensor's memory as if contiguous: a gradient with transposed strides would be
        # applied to the wrong elements (heads/layers.py computes dense ones, so this copies nothing there). CUDA's
        # multi-tensor kernels want dense tensors too.
        grads = [grad.contiguous() for grad in self.stack.model_blocks(grads)]
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
        stack = ParamStack(self.stack.shapes, self.stack.select(self.stack.flat.detach(), keep), len(keep),
                           self.stack.pieces)
        kept = BatchedAdam.__new__(BatchedAdam)
        kept.stack, kept.lrs, kept.betas, kept.eps, kept.steps = (stack, [self.lrs[i] for i in keep.tolist()],
                                                                  self.betas, self.eps, self.steps)
        kept.fused, kept.compute_dtype, kept.full_precision = self.fused, self.compute_dtype, self.full_precision
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
