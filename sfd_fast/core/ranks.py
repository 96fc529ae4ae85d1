"""Which process am I, and where do collectives live: the two questions the step's guard asks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def comm_device() -> torch.device:
    """Where collective inputs must live: the current CUDA device for NCCL, CPU for gloo."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
