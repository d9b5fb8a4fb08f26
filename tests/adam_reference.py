"""torch.optim.Adam, one per model, as the reference that the stacked BatchedAdam is checked against."""

import torch

from fusion.heads.optim import BatchedAdam, ParamStack


def assert_steps_like_torch_adam(shapes: dict, models: list[dict], lrs: list[float], fused: bool, grad_steps) -> None:
    """Step BatchedAdam over `models` and a torch.optim.Adam per model with each list of (M, *shape) gradients from
    `grad_steps`; every model's parameters must end where its own torch Adam put them."""
    optimizer = BatchedAdam(ParamStack.from_models(shapes, models), lrs, fused=fused)
    references = [{k: v.clone().requires_grad_() for k, v in m.items()} for m in models]
    torch_adams = [torch.optim.Adam(list(r.values()), lr=lr) for r, lr in zip(references, lrs)]
    for grads in grad_steps:
        optimizer.step(grads)
        for m, (reference, adam) in enumerate(zip(references, torch_adams)):
            for grad, param in zip(grads, reference.values()):
                param.grad = grad[m].clone()
            adam.step()
    for m, reference in enumerate(references):
        for name, param in reference.items():
            torch.testing.assert_close(optimizer.stack.params[name][m], param.detach(), rtol=1e-5, atol=1e-6)
