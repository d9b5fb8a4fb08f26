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
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from fusion.errors import FusionError


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def distributed_context():
    """Yields (rank, world_size); initialises and tears down the process group when launched by torchrun."""
    if not launched_by_torchrun():
        yield 0, 1
        return
    refuse_restart_on_shared_store()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Long timeout: rank 0 waits at the barrier while the slowest shard finishes.
    dist.init_process_group(backend=backend, timeout=timedelta(hours=12))
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


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
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces only CUDA tensors
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())
