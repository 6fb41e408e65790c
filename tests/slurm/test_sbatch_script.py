"""slurm/sbatch/dtrain.sbatch starts its ranks as `dtrain submit`'s jobs do: the same srun task options (the job's
--cpus-per-task on srun, which Slurm >= 22.05 no longer passes on by itself) and the same rendezvous port, below
the ephemeral range. Runs the real script under bash with stand-ins for srun/scontrol that record what they get:
no Slurm needed."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from dtrain_launch.slurm import executor_parameters, load_profile, rendezvous_port, sbatch_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "sbatch" / "dtrain.sbatch"
H100_PROFILE = REPO / "slurm" / "clusters" / "h100.yaml"

SRUN = """#!/bin/bash
# what the ranks would get: srun's options up to the task command, and the rendezvous
for arg in "$@"; do [[ $arg == bash ]] && break; echo "$arg"; done > "$RECORD/srun-args"
echo "$MASTER_ADDR:$MASTER_PORT" > "$RECORD/rendezvous"
"""
SCONTROL = """#!/bin/bash
[[ $1 == show && $2 == hostnames ]] && { echo node1; echo node2; }
"""


def run_plain_script(tmp_path: Path, job_id: str, restarts: int, cpus_per_task: int) -> dict[str, object]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in {"srun": SRUN, "scontrol": SCONTROL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    slurm = {"SLURM_JOB_ID": job_id, "SLURM_RESTART_COUNT": str(restarts), "SLURM_CPUS_PER_TASK": str(cpus_per_task),
             "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8"}  # fmt: skip
    env = {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "RECORD": str(tmp_path), "PYTHONPATH": str(REPO)}  # fmt: skip
    done = subprocess.run(["bash", str(SCRIPT), "run.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and "dtrain: finished" in done.stdout, done.stdout + done.stderr
    srun_args = (tmp_path / "srun-args").read_text().split()
    return {"srun": [a for a in srun_args if not a.startswith(("--open-mode", "--output", "--error"))],
            "rendezvous": (tmp_path / "rendezvous").read_text().strip()}  # fmt: skip


def submitit_srun_args(cpus_per_task: int) -> list[str]:
    """The srun options of the batch script `dtrain submit` has submitit write, for a profile with these cores."""
    profile = load_profile(H100_PROFILE)
    profile.cpus_per_task, profile.srun_args = cpus_per_task, []
    text = sbatch_script(executor_parameters(profile, 2, "x"), Path("/runs/x"), "python")
    srun = shlex.split(next(line for line in text.splitlines() if line.startswith("srun ")))
    return [a for a in srun[1 : srun.index("python")] if a.startswith("--") and a != "--unbuffered"
            and not a.startswith(("--output", "--error")) and not a.startswith("/")]  # fmt: skip


def test_plain_sbatch_gives_srun_the_tasks_cpus_and_the_submit_path_port(tmp_path):
    plain = run_plain_script(tmp_path, job_id="4242", restarts=1, cpus_per_task=12)
    assert plain["srun"] == submitit_srun_args(12) == ["--kill-on-bad-exit=1", "--cpus-per-task=12"]
    # the port the submitit path's tasks export (launch/slurm_job.py) for this job and restart
    assert plain["rendezvous"] == f"node1:{rendezvous_port('4242', 1)}"
    port = int(plain["rendezvous"].split(":")[1])
    low, _high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert port < min(low, 32768), f"port {port} is in the ephemeral range (from {low})"


def test_both_job_scripts_leave_nccl_its_own_interface_choice_and_give_every_task_all_gpus():
    """A hard-coded NCCL_SOCKET_IFNAME (ib0 in the example profile once) fails every job where the interface is
    named otherwise; one GPU per task (--gpus-per-task, --gpu-bind=single) hides the other GPUs of the node from
    each rank and with them CUDA P2P over NVLink (slurm/README.md)."""
    profile = load_profile(H100_PROFILE)
    submitted = sbatch_script(executor_parameters(profile, 4, "x"), Path("/runs/x"), "python")
    plain = [line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("# ")]
    for name, lines in {"dtrain submit": submitted.splitlines(), "dtrain.sbatch": plain}.items():
        assert not [line for line in lines if "NCCL_SOCKET_IFNAME" in line or "NCCL_IB_HCA" in line], name
        assert [line for line in lines if line.startswith("#SBATCH --gpus-per-node=8")], name
        assert not [line for line in lines if "--gpus-per-task" in line or "--gpu-bind" in line], name
