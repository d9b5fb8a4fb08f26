"""Where and in what precision each stage runs: the device by name, the precisions per stage, autocast, and the
CPU's bf16 units. The one owner of these choices: extraction, training, prediction and serving all ask here.

torch is imported inside the functions, so the tables can be read (a command's choices, its argument checks) without
paying for torch.

The trainer runs the same code on every device: its tensors are created on the features' device, its random draws
(shuffling, dropout noise, initial weights) come from CPU generators and are moved there, so a seed means the same
minibatches and masks on a CPU and on a GPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from fusion.errors import FusionError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
# The precisions each stage accepts. Encoders take fp16 too (a GPU only); heads train in fp32 or bf16 (head_dtype).
ENCODER_PRECISIONS = ("fp32", "bf16", "fp16")
HEAD_PRECISIONS = ("fp32", "bf16")


class DeviceError(FusionError):
    """A device or precision this machine cannot give (no GPU, a GPU past the count, bf16 without bf16 units)."""


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when torch sees one, else cpu; cpu; cuda (the current GPU) or cuda:N with N among the visible
    GPUs. Anything else, or a GPU that is not there, -> DeviceError in one line."""
    check_device_name(name)
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {name} asked for, but torch {torch.__version__} sees no CUDA device "
                          "(use --device cpu or auto)")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if name == "cuda" else int(name[5:])
    if index >= count:
        raise DeviceError(f"--device {name}: torch sees {count} GPU(s) here (cuda:0..cuda:{count - 1}; "
                          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch.device("cuda", index)


def check_device_name(name: str) -> None:
    """A name resolve_device could resolve on some machine (auto, cpu, cuda, cuda:N), checked without torch."""
    if not (name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit())):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")


def check_encoder_precision(precision: str) -> None:
    if precision not in ENCODER_PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}: choose one of {', '.join(ENCODER_PRECISIONS)}")


def use_device(target: torch.device) -> None:
    """Makes a CUDA target the process's current device, so that everything not placed explicitly (the loader's
    pinning thread, the CUDA context) lands on that GPU rather than on GPU 0. Nothing for the CPU."""
    if target.type == "cuda":
        import torch

        torch.cuda.set_device(target.index)


def bf16_units() -> str:
    """What bf16 matmuls run on in this CPU: "amx" (AMX tiles), "avx512_bf16" (dot-product instructions, at most
    twice fp32) or "none" (emulated, many times slower than fp32)."""
    import torch

    if torch.cpu._is_amx_tile_supported():
        return "amx"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return "none"


def check_precision(precision: str, device: torch.device) -> None:
    """Heads in bf16 on a CPU without bf16 units are refused: emulated, far slower than fp32 (the encoders refuse
    fp16 on a CPU for the same reason, encoder_dtypes)."""
    check_head_precision(precision)
    if precision == "bf16" and device.type == "cpu" and bf16_units() == "none":
        raise DeviceError("--precision bf16 on this CPU would be emulated (it has neither AMX nor avx512_bf16), many "
                          "times slower than fp32: use --precision fp32, or a GPU with --device cuda")


def training_device(name: str, precision: str) -> torch.device:
    """The device `fit`/`grid --device NAME --precision P` train on; refused in one line when it cannot."""
    device = resolve_device(name)
    check_precision(precision, device)
    return device


def head_dtype(precision: str) -> torch.dtype:
    """The dtype a head's training computes in: its products, activations and gradients, and the features it is fed
    (cast once per pass). bf16 keeps the weights, Adam's state and the losses in fp32 (heads/optim.py BatchedAdam
    multiplies a bf16 copy of the weights, refreshed once per step); there is no autocast, which would cast every
    weight again for every product."""
    import torch

    check_head_precision(precision)
    return torch.bfloat16 if precision == "bf16" else torch.float32


def check_head_precision(precision: str) -> None:
    if precision not in HEAD_PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r} for the heads: choose one of {', '.join(HEAD_PRECISIONS)}")


def autocast(precision: str, device: torch.device):
    """bf16: matmuls in bf16 under torch.autocast, everything it keeps in fp32 (losses, softmax) stays there;
    fp32: no context at all, so fp32 runs exactly the code it always ran."""
    if precision == "bf16":
        import torch

        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def encoder_dtypes(device: torch.device, precision: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of the encoders' inputs and of most weights, autocast dtype or None) for a precision on a device.

    On CPU, bf16 runs under autocast: the matrix products and attention use the bf16 units (avx512_bf16 / AMX)
    while layer norms, softmax and residual sums stay fp32, which stays closer to fp32 than a model cast wholly to
    bf16 for about the same speed (docs/performance.md gives the figures). fp16 on CPU has no matrix units to use and
    is slower than fp32, so it is refused.
    On CUDA, bf16 and fp16 cast the whole model. So "bf16" is not the same computation on the two devices: the
    cache fingerprint records the device type with the precision, and a cache started on one is not resumed on the
    other (extract/pipeline.py).
    """
    check_encoder_precision(precision)
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cpu" and dtype == torch.float16:
        raise DeviceError("--precision fp16 needs a GPU: on CPU it is slower than fp32; use --precision bf16 "
                          "(or fp32) on CPU")
    if device.type == "cpu" and dtype == torch.bfloat16:
        return torch.float32, torch.bfloat16
    return dtype, None


def run_encoder_precision(extracted: str, device: torch.device) -> tuple[str, str | None]:
    """The precision a run's encoders use on `device` when the run's cache was extracted in `extracted`, and a note
    when the two differ: fp16 needs a GPU, so on a CPU an fp16 run's encoders run in fp32."""
    if extracted == "fp16" and device.type == "cpu":
        return "fp32", ("this run's cache was extracted in fp16 on a GPU; on this CPU its encoders run in fp32, so "
                        "the embeddings differ from the cache's by about fp16's rounding")
    return extracted, None
