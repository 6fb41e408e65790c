"""Functions that run *inside* Slurm jobs of the test-cluster smoke tests.

They live in a module (not in the test file) so the job can import them: the submitit executor from conftest puts
this directory on the job's PYTHONPATH.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import submitit


def gloo_allreduce() -> dict:
    """One rank of a CPU all_reduce over gloo, set up from Slurm's environment by submitit."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    dist.init_process_group(backend="gloo")
    try:
        t = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(t)
        return {
            "rank": env.rank,
            "world_size": env.world_size,
            "local_rank": env.local_rank,
            "master_addr": env.master_addr,
            "master_port": env.master_port,
            "hostname": socket.gethostname(),
            "sum": t.item(),
        }
    finally:
        dist.destroy_process_group()


class SleepUntilCheckpointed(submitit.helpers.Checkpointable):
    """First run: marks that it started, then sleeps. When interrupted (USR2), checkpoint() records that it ran and
    resubmits itself; the requeued run sees `checkpointed` and returns at once."""

    def __init__(self, marker_dir: str, sleep_s: float = 600) -> None:
        self.marker_dir = marker_dir
        self.sleep_s = sleep_s
        self.checkpointed = False
        self.runs = 0

    def __call__(self) -> dict:
        self.runs += 1
        d = Path(self.marker_dir)
        (d / f"started.{self.runs}").write_text(str(time.time()))
        if not self.checkpointed:
            end = time.monotonic() + self.sleep_s
            while time.monotonic() < end:
                time.sleep(0.2)
        return {
            "runs": self.runs,
            "checkpointed": self.checkpointed,
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        }

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        self.checkpointed = True
        (Path(self.marker_dir) / "checkpointed").write_text(str(time.time()))
        return super().checkpoint(*args, **kwargs)


def sleep_then_return(seconds: float, marker: str | None = None, first_run_seconds: float | None = None) -> dict:
    """Marks the start (if asked), sleeps (`first_run_seconds` on the first run if given), returns how many times
    Slurm restarted it."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if marker:
        Path(marker).write_text(str(restarts))
    time.sleep(first_run_seconds if restarts == 0 and first_run_seconds is not None else seconds)
    return {"restart_count": restarts, "job_id": os.environ["SLURM_JOB_ID"]}
