"""dtrain.dist on cluster layouts this machine does not have: CPUs bound per Slurm task, one GPU per task.

No process group, no GPU: the CPU affinity and the CUDA device count are faked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dtrain import dist


@pytest.mark.parametrize(
    "environ,affinity,threads",
    [
        ({"SLURM_CPUS_PER_TASK": "12"}, set(range(12)), 12),  # srun bound the task to its 12 CPUs
        ({"SLURM_CPUS_PER_TASK": "12"}, {0}, 1),  # the job asked 12, srun bound 1 (22.05 without -c): what it has
        ({"LOCAL_WORLD_SIZE": "2"}, set(range(8)), 4),  # torchrun on a workstation: the ranks share the node
        ({}, {0}, 1),
    ],
)
def test_rank_threads_are_the_rank_s_own_cpus(monkeypatch, environ, affinity, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity)
    assert dist.rank_threads(environ) == threads


def test_one_gpu_per_task_maps_to_the_visible_device():
    environ = {"RANK": "11", "LOCAL_RANK": "3"}
    assert dist.cuda_device_index(environ, device_count=8) == 3 and environ["LOCAL_RANK"] == "3"
    assert dist.cuda_device_index(environ, device_count=1) == 0
    assert environ["LOCAL_RANK"] == "0" and environ["DTRAIN_NODE_LOCAL_RANK"] == "3"  # DeepSpeed reads LOCAL_RANK


def test_other_gpu_binding_is_refused_naming_the_slurm_options():
    with pytest.raises(RuntimeError) as e:
        dist.cuda_device_index({"RANK": "5", "LOCAL_RANK": "5", "CUDA_VISIBLE_DEVICES": "4,5"}, device_count=2)
    message = str(e.value)
    assert "local rank 5 but sees 2 CUDA device(s) (CUDA_VISIBLE_DEVICES=4,5)" in message
    assert "--gpus-per-node" in message and "--gpu-bind" in message and "--gpus-per-task" in message


def test_compute_init_on_a_gpu_node_binds_the_device_and_sets_threads(monkeypatch):
    """The CUDA branch, faked: a task of a site binding one GPU per task, with 2 CPUs bound by Slurm."""
    import deepspeed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_CPUS_PER_TASK": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    try:
        env = dist.compute_init()
        assert (env.device, env.backend, env.local_rank, env.rank) == (torch.device("cuda", 0), "nccl", 0, 3)
        assert os.environ["LOCAL_RANK"] == "0" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def _decide_on_two_ranks(rank: int, store: str, out: str) -> None:
    import json

    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", store=torch_dist.FileStore(store, 2), rank=rank, world_size=2)
    # rank 1's node still sees an older state of the checkpoint folder
    view = {0: "step-00000008", 1: "step-00000004"}[rank]
    picked = dist.decided_by_main(lambda: view)
    try:
        dist.decided_by_main(lambda: 1 / 0 if torch_dist.get_rank() == 0 else "never asked")
        raised = None
    except ZeroDivisionError as e:
        raised = str(e)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"picked": picked, "raised": raised}))
    torch_dist.destroy_process_group()


def test_every_rank_takes_rank_0_s_decision_or_its_error(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_decide_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results == [{"picked": "step-00000008", "raised": "division by zero"}] * 2


_DP_GROUP_TIMEOUT = """
import torch
from dtrain import dist

env = dist.compute_init(timeout_minutes=7)
import deepspeed

model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
group = engine.optimizer.dp_process_group
print("dp group timeout", group._get_backend(env.device).options._timeout)
"""


def test_zero_data_parallel_group_gets_the_configured_timeout(tmp_path):
    """deepspeed.timeout_minutes reaches the group that carries ZeRO's reduce-scatter, not only the world group
    (torch's default for a new group is 10 min with NCCL, 30 min with gloo)."""
    import subprocess
    import sys

    from tests.helpers import REPO

    proc = subprocess.run([sys.executable, "-c", _DP_GROUP_TIMEOUT], capture_output=True, text=True, cwd=REPO,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp group timeout 0:07:00" in proc.stdout, proc.stdout
