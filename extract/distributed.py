"""Many processes, one cache: `torchrun --nproc-per-node N -m fusion.cli extract ...`.

Each rank embeds its share of the batches (`pipeline.shard_batches`: the whole dataset's length-sorted batches dealt
round-robin, so the cache is bit-identical whatever the number of ranks) into the shared `OUT.partial/` folder, with
its own batch files and lock; rank 0 merges everything in plan order once all ranks have passed the barrier.
A rank that dies takes the job down (torchrun stops the others); running the same command again resumes every rank
from its finished batch files. torchrun's own `--max-restarts` resumes the same way, but in torch 2.13 a restarted
worker cannot re-form the process group on the rendezvous store torchrun shares with it (the old workers' addresses
are still there): it needs `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone ...` (or `--rdzv-backend
c10d`); without it a restarted worker stops with that advice instead of hanging. Across machines this needs the output
folder on a shared filesystem. Without torchrun's environment this is a single process and nothing is initialised.

The ranks exchange nothing but control (one barrier, one integer sum), so the process group is gloo whatever device
the encoders use: NCCL would need one GPU per rank and CUDA tensors for that integer, and would fail for `--device cpu`
on a GPU machine, for two ranks sharing one GPU, and for SLURM tasks that each see one GPU. The encoders' device is
`rank_device`'s: `--device cuda` (or auto, with a GPU) means cuda:LOCAL_RANK, wrapped onto the GPUs this process sees.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from fusion.errors import FusionError

CONTROL_BACKEND = "gloo"


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def distributed_context():
    """Yields (rank, world_size); initialises and tears down the process group when launched by torchrun."""
    if not launched_by_torchrun():
        yield 0, 1
        return
    refuse_restart_on_shared_store()
    # Long timeout: rank 0 waits at the barrier while the slowest shard finishes.
    dist.init_process_group(backend=CONTROL_BACKEND, timeout=timedelta(hours=12))
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def rank_device(device: str, world_size: int) -> str:
    """The device this rank's encoders use. With several ranks, `cuda` (and `auto` where torch sees a GPU) is
    cuda:LOCAL_RANK modulo the visible GPUs: 4 ranks on 4 GPUs get one each, 2 ranks on 1 GPU share it, a SLURM task
    that sees one GPU uses it. An explicit cuda:N would put every rank on one GPU, so it is refused; cpu stays cpu.
    A single process keeps `device` as given (device.py resolve_device checks it)."""
    if world_size <= 1:
        return device
    if device.startswith("cuda:"):
        raise FusionError(f"--device {device} with {world_size} ranks would put every rank on one GPU; use "
                          f"--device cuda (each rank takes cuda:LOCAL_RANK), or CUDA_VISIBLE_DEVICES to choose GPUs")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" or not torch.cuda.is_available():  # without a GPU, resolve_device says so in one line
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"


def refuse_restart_on_shared_store() -> None:
    """Seen with torch 2.13 (pytorch issue 135712): the restarted group dials the dead workers' addresses and, with
    this module's long timeout, would wait for hours."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise FusionError("torchrun restarted this worker, but a restarted worker cannot rejoin torchrun's shared "
                          "rendezvous store; run the same command again to resume, or launch with "
                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone ... --max-restarts N")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def sum_over_ranks(value: int) -> int:
    """The total of an integer over all ranks (every rank gets it); the value itself in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = torch.tensor([value], dtype=torch.int64)  # gloo reduces CPU tensors
    dist.all_reduce(total)
    return int(total.item())
