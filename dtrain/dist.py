"""The one module that reads the distributed environment (torchrun / Slurm variables) and picks the device.

The device, backend and DeepSpeed accelerator follow from what the machine has: CUDA + NCCL on GPU nodes,
CPU + gloo elsewhere. Nothing here is hard-coded to CPU.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch

T = TypeVar("T")


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
    """Name of the DeepSpeed accelerator for this machine; must run before deepspeed is imported. Also points the
    op cache at this machine type's folder (dtrain.ops.use_ops_cache), before any op loads."""
    from dtrain.ops import use_ops_cache

    name = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", name)
    use_ops_cache()
    return os.environ["DS_ACCELERATOR"]


def compute_init(timeout_minutes: int = 30) -> DistEnv:
    """Join the process group started by torchrun or Slurm (or a single process without one)."""
    select_accelerator()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    # Data loading, host copies and CPU Adam run on the rank's own cores, on every device kind.
    torch.set_num_threads(rank_threads(os.environ))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", cuda_device_index(os.environ, torch.cuda.device_count())), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # after cuda_device_index, which may rewrite it
    if "MASTER_ADDR" not in os.environ:  # plain `python -m dtrain.train`: a group of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("LOCAL_RANK", "0")
    # DeepSpeed's ZeRO calls these torch collectives on every step; torch 2.13 warns at each call, flooding the log.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`")
    import deepspeed

    from dtrain import deepspeed_fixes

    timeout = timedelta(minutes=timeout_minutes)
    deepspeed_fixes.before_init()
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    deepspeed_fixes.apply(timeout)
    return DistEnv(rank, local_rank, world_size, device, backend)


def rank_threads(environ: MutableMapping[str, str]) -> int:
    """CPU threads for this rank: the CPUs it may run on, as Slurm bound them (SLURM_CPUS_PER_TASK, its affinity).

    Without a per-task count (torchrun on a workstation) the ranks of a node share its CPUs, and each takes its
    share: every rank spawning a thread per core would oversubscribe the node and slow all of them down."""
    cpus = len(os.sched_getaffinity(0))
    per_task = environ.get("SLURM_CPUS_PER_TASK")
    if per_task:
        return max(1, min(int(per_task), cpus))
    return max(1, cpus // max(1, int(environ.get("LOCAL_WORLD_SIZE", 1))))


def cuda_device_index(environ: MutableMapping[str, str], device_count: int) -> int:
    """The CUDA device of this rank: cuda:LOCAL_RANK when the task sees the node's GPUs.

    Sites that bind one GPU per task (`--gpus-per-task=1`, `--gpu-bind=single:1`) show each rank a single device,
    its own, as cuda:0: then LOCAL_RANK is rewritten to 0, since DeepSpeed picks its device from LOCAL_RANK too.
    Any other mismatch is refused, naming the Slurm options that cause it."""
    local_rank = int(environ.get("LOCAL_RANK", 0))
    if local_rank < device_count:
        return local_rank
    if device_count == 1:
        environ["DTRAIN_NODE_LOCAL_RANK"] = str(local_rank)  # still the rank's place on its node, for the logs
        environ["LOCAL_RANK"] = "0"
        return 0
    raise RuntimeError(
        f"rank {environ.get('RANK', '?')} on {socket.gethostname()} is local rank {local_rank} but sees "
        f"{device_count} CUDA device(s) (CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
        "give every task either all of the node's GPUs (--gpus-per-node, no --gpus-per-task / --gpu-bind in the "
        "profile's srun_args or sbatch_extra) or exactly one (--gpus-per-task=1 / --gpu-bind=single:1)"
    )


def decided_by_main(decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 alone, its result given to every rank (or its exception raised on every rank).

    For decisions read from shared storage: nodes of a network file system can see different states of one folder
    for seconds (attribute caching), and ranks that decide on their own may then disagree."""
    import torch.distributed as dist

    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, decide())
        except Exception as e:  # the others must not wait forever in the broadcast for a decision that never comes
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
