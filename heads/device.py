"""Where and in what precision heads train: the device by name, the CPU's bf16 units, and autocast.

The trainer runs the same code on every device: its tensors are created on the features' device, its random draws
(shuffling, dropout noise, initial weights) come from CPU generators and are moved there, so a seed means the same
minibatches and masks on a CPU and on a GPU.
"""

from __future__ import annotations

import contextlib

import torch

from fusion.errors import FusionError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when torch sees one, else cpu; cuda[:N] without a CUDA device -> FusionError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name == "cpu" or name == "cuda" or name.startswith("cuda:")):
        raise FusionError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FusionError(f"--device {name} asked for, but torch {torch.__version__} sees no CUDA device "
                          "(use --device cpu or auto)")
    return torch.device(name)


def bf16_units() -> str:
    """What bf16 matmuls run on in this CPU: "amx" (AMX tiles), "avx512_bf16" (dot-product instructions, at most
    twice fp32) or "none" (emulated, many times slower than fp32)."""
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return "none"


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 on a CPU without bf16 units is refused: it would be emulated, far slower than fp32 (extraction refuses
    fp16 on a CPU for the same reason)."""
    if precision == "bf16" and device.type == "cpu" and bf16_units() == "none":
        raise FusionError("--precision bf16 on this CPU would be emulated (it has neither AMX nor avx512_bf16), many "
                          "times slower than fp32: use --precision fp32, or a GPU with --device cuda")


def autocast(precision: str, device: torch.device):
    """bf16: matmuls in bf16 under torch.autocast, everything it keeps in fp32 (losses, softmax) stays there;
    fp32: no context at all, so fp32 runs exactly the code it always ran."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_device(name: str, precision: str) -> torch.device:
    """The device `fit`/`grid --device NAME --precision P` train on; refused in one line when it cannot."""
    device = resolve_device(name)
    check_precision(precision, device)
    return device
