"""The one module that reads the distributed environment (torchrun / Slurm variables) and picks the device.

The device, backend and DeepSpeed accelerator follow from what the machine has: CUDA + NCCL on GPU nodes,
CPU + gloo elsewhere. Nothing here is hard-coded to CPU.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_accelerator() -> str:
    """Name of the DeepSpeed accelerator for this machine; must run before deepspeed is imported."""
    name = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", name)
    return os.environ["DS_ACCELERATOR"]


def compute_init(timeout_minutes: int = 30) -> DistEnv:
    """Join the process group started by torchrun (or a single process without one)."""
    select_accelerator()
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
        # Two ranks on a small host each spawning one thread per core oversubscribe it and slow both down.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    if "MASTER_ADDR" not in os.environ:  # plain `python -m dtrain.train`: a group of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("LOCAL_RANK", "0")
    # DeepSpeed's ZeRO calls these torch collectives on every step; torch 2.13 warns at each call, flooding the log.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`")
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return DistEnv(rank, local_rank, world_size, device, backend)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
