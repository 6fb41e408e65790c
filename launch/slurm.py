"""Slurm from the login node: cluster profiles, the job's sbatch parameters as data, submit, status, cancel.

A job is N nodes x G tasks, one task per GPU, each task one rank (slurm/README.md says why not torchrun per node);
what runs inside a task is launch/slurm_job.py. Everything about a submission is computed by pure functions
(`plan_job`, `executor_parameters`, `sbatch_script`) before submitit runs sbatch, so it is testable without Slurm
and the generated script can be compared with a golden file.

The run folder (the config's output_dir) holds everything: `slurm/` is submitit's folder (per-task logs
`<job>_<task>_log.out|err`, the generated `<job>_submission.sh`, pickles) plus `jobs.jsonl` (one line per
submission, read by `dtrain status` / `dtrain cancel`) and the config snapshots the jobs run from.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtrain.config import Config, ConfigError, load_typed
from dtrain.plan.hardware import Hardware
from dtrain.units import parse_size

RECORDS = "jobs.jsonl"
# rank 0 of a job prints these; `dtrain status` reads them
RUN_START_LINE = "dtrain: job"  # each time the job (re)starts
REQUEUE_LINE = "dtrain: requeueing"  # each requeue dtrain asks for, before or after training started
# states in which a job still holds (or will hold) the run folder; see `man squeue`
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "COMPLETING",
                 "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"}  # fmt: skip


@dataclass
class ClusterProfile:
    """A cluster's Slurm settings (slurm/clusters/*.yaml). Null means: leave it to the cluster's default."""

    partition: str | None = None
    """Slurm partition (sbatch --partition)."""
    account: str | None = None
    """Account charged (--account)."""
    qos: str | None = None
    """Quality of service (--qos)."""
    nodes: int = 1
    """Nodes when `dtrain submit` is given no --nodes."""
    gpus_per_node: int = 0
    """GPUs per node (--gpus-per-node); 0 on CPU-only clusters."""
    tasks_per_node: int | None = None
    """Ranks per node; default gpus_per_node (one task per GPU). Required when gpus_per_node is 0."""
    cpus_per_task: int | None = None
    """CPU cores per rank (--cpus-per-task): data loading, optimizer offload (CPU Adam) and host copies use them."""
    mem_gb: int | None = None
    """Host memory per node in GB (--mem); 0 asks for all of it. CPU offload of a 70B model needs ~1 TB per node."""
    constraint: str | None = None
    """Node features (--constraint), e.g. h100."""
    gpu_mem: str | None = None
    """Memory of one GPU, e.g. 80GB. With node_mem, `dtrain submit` refuses a run that cannot fit, like
    `dtrain check --gpu-mem --cpu-mem`; without them the fit is not checked."""
    node_mem: str | None = None
    """CPU RAM of one node, e.g. 1TB (for the fit check; the job asks for mem_gb)."""
    nvme: str | None = None
    """Local NVMe of one node, e.g. 3.5TB (for the fit check of NVMe offload)."""
    time_limit_min: int = 240
    """Wall-clock limit per job run (--time); a requeued run gets the same limit again."""
    signal_lead_s: int = 300
    """SIGUSR2 this many seconds before the time limit (--signal=USR2@lead): must cover finishing the current step
    plus writing a full checkpoint."""
    max_requeues: int = 10
    """Requeues after a SIGUSR2 before the job gives up (and fails, its last checkpoint kept)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines the batch script runs before srun: module loads, activating the environment, NCCL variables."""
    sbatch_extra: dict[str, str | int | bool] = field(default_factory=dict)
    """Further #SBATCH options as name: value (true for a bare flag), e.g. {exclusive: true, reservation: llm}."""
    srun_args: list[str] = field(default_factory=list)
    """Extra srun arguments (dtrain always adds --kill-on-bad-exit=1: one dead rank ends the job, and
    --cpus-per-task, which srun no longer takes from sbatch since Slurm 22.05)."""
    wckey: str | None = None
    """Workload characterization key (--wckey); null sends none (submitit's default `submitit` is refused by
    clusters that check wckeys)."""
    node_local: list[str] = field(default_factory=lambda: ["/tmp", "/var/tmp", "/dev/shm"])
    """Folders that are node-local on this cluster (each node has its own). A multi-node run is refused before
    submitting when its run folder, checkpoints or data cache would be in one: they must be on shared storage."""
    python: str | None = None
    """Python command inside the job; default the interpreter running `dtrain submit` (same venv on shared disk)."""


# options dtrain sets itself from the run and the profile fields above; sbatch_extra must not fight them
_OWNED_OPTIONS = {
    "job-name": "the run folder's name", "nodes": "--nodes / nodes", "ntasks-per-node": "tasks_per_node",
    "gpus-per-node": "gpus_per_node", "cpus-per-task": "cpus_per_task", "mem": "mem_gb", "time": "time_limit_min",
    "signal": "signal_lead_s", "partition": "partition", "account": "account", "qos": "qos",
    "constraint": "constraint", "requeue": "max_requeues", "output": "the run folder", "error": "the run folder",
    "open-mode": "the run folder", "wckey": "wckey",
}  # fmt: skip


def _option(key: str) -> str:
    """sbatch option name of an sbatch_extra key: `mail_type` and `--mail-type` are `mail-type`."""
    return key.replace("_", "-").lstrip("-")


def validate_profile(p: ClusterProfile) -> list[str]:
    """Cross-field problems of a profile whose types are right, each prefixed by its key."""
    return _shape_problems(p) + _time_problems(p) + _hardware_problems(p) + _extra_problems(p)


def _shape_problems(p: ClusterProfile) -> list[str]:
    problems = [f"{name}: must be >= 1, got {getattr(p, name)}" for name in ("nodes", "tasks_per_node", "cpus_per_task")
                if getattr(p, name) is not None and getattr(p, name) < 1]  # fmt: skip
    if p.gpus_per_node < 0:
        problems.append(f"gpus_per_node: must be >= 0, got {p.gpus_per_node}")
    if p.tasks_per_node is None and p.gpus_per_node == 0:
        problems.append("tasks_per_node: required when gpus_per_node is 0 (ranks per node on a CPU-only cluster)")
    if p.tasks_per_node is not None and p.gpus_per_node and p.tasks_per_node != p.gpus_per_node:
        problems.append(
            f"tasks_per_node: {p.tasks_per_node} differs from gpus_per_node {p.gpus_per_node}; every rank drives "
            "one GPU (leave tasks_per_node out)"
        )
    if p.mem_gb is not None and p.mem_gb < 0:
        problems.append(f"mem_gb: must be >= 0 (0: all of the node's memory), got {p.mem_gb}")
    problems += [f"node_local: {path!r} is not an absolute path" for path in p.node_local if not path.startswith("/")]
    return problems


def _time_problems(p: ClusterProfile) -> list[str]:
    problems = []
    if p.time_limit_min < 1:
        problems.append(f"time_limit_min: must be >= 1, got {p.time_limit_min}")
    if not 0 < p.signal_lead_s < p.time_limit_min * 60:
        problems.append(
            f"signal_lead_s: must be > 0 and below the time limit ({p.time_limit_min * 60} s), got {p.signal_lead_s}"
        )
    if p.max_requeues < 0:
        problems.append(f"max_requeues: must be >= 0, got {p.max_requeues}")
    return problems


def _hardware_problems(p: ClusterProfile) -> list[str]:
    problems = []
    for name in ("gpu_mem", "node_mem", "nvme"):
        try:
            if getattr(p, name) is not None:
                parse_size(getattr(p, name))
        except ValueError as e:
            problems.append(f"{name}: {e}")
    if (p.gpu_mem is None) != (p.node_mem is None):
        problems.append("gpu_mem, node_mem: give both (the fit check needs both) or neither")
    if p.gpu_mem is not None and p.gpus_per_node == 0:
        problems.append("gpu_mem: given, but gpus_per_node is 0")
    return problems


def _extra_problems(p: ClusterProfile) -> list[str]:
    return [f"sbatch_extra.{key}: set by dtrain (use {_OWNED_OPTIONS[_option(key)]})"
            for key in p.sbatch_extra if _option(key) in _OWNED_OPTIONS]  # fmt: skip


def storage_problems(cfg: Config, profile: ClusterProfile, nodes: int, workdir: Path) -> list[str]:
    """Folders of a multi-node run that would be node-local, each with why it must be shared.

    Every one is written by some ranks and read by others on other nodes: the run folder holds submitit's job
    pickles (every task loads them) and the requeued job's logs; all ranks write their shards into one checkpoint
    folder that rank 0 then renames, and its universal conversion (made by rank 0) is read by all; the data cache is
    prepared by rank 0 alone while the others wait for it to appear. On one node, node-local storage is fine."""
    if nodes < 2:
        return []

    folders = {
        "output_dir": (cfg.output_dir, "the Slurm job's files and logs are read by the tasks of every node"),
        "checkpoint.dir": (cfg.checkpoint_dir, "the ranks of every node write one checkpoint, and resume from it"),
        "data.cache_dir": (cfg.cache_dir, "rank 0 prepares the data once, the ranks of every node read it"),
    }
    local = [Path(p) for p in profile.node_local]
    problems = []
    for key, (folder, why) in folders.items():
        path = (workdir / folder).resolve()
        inside = next((root for root in local if path.is_relative_to(root)), None)
        if inside is not None:
            problems.append(f"{key}: {path} is node-local on this cluster ({inside}, see the profile's node_local) "
                            f"but must be on shared storage for {nodes} nodes: {why}")  # fmt: skip
    return problems


def hardware(profile: ClusterProfile, nodes: int) -> Hardware | None:
    """What `dtrain plan` / the fit check needs to know of the nodes; None when the profile does not say."""
    if profile.gpu_mem is None or profile.node_mem is None or not profile.gpus_per_node:
        return None
    nvme = parse_size(profile.nvme) if profile.nvme else None
    return Hardware(nodes, profile.gpus_per_node, parse_size(profile.gpu_mem), parse_size(profile.node_mem), nvme)


def load_profile(path: str | Path) -> ClusterProfile:
    """Read and validate a cluster profile; raises ConfigError listing every problem with its key."""
    return load_typed(ClusterProfile, path, validate_profile)


# ---------------------------------------------------------------------------------------------------------------
# One submission, as data


@dataclass(frozen=True)
class JobPlan:
    run_dir: Path  # absolute output_dir of the run
    nodes: int
    tasks_per_node: int
    job_name: str
    parameters: dict[str, Any]  # submitit SlurmExecutor parameters (sbatch options + setup + srun args)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def folder(self) -> Path:
        """submitit's folder: per-task logs, the generated sbatch script, pickles, jobs.jsonl."""
        return self.run_dir / "slurm"


def plan_job(cfg: Config, profile: ClusterProfile, nodes: int | None, workdir: Path) -> JobPlan:
    nodes = profile.nodes if nodes is None else nodes
    if nodes < 1:
        raise ConfigError([f"--nodes: must be >= 1, got {nodes}"])
    run_dir = (workdir / cfg.output_dir).resolve()
    job_name = f"dtrain-{run_dir.name}"
    return JobPlan(run_dir, nodes, tasks_per_node(profile), job_name, executor_parameters(profile, nodes, job_name))


def tasks_per_node(profile: ClusterProfile) -> int:
    """Ranks per node: one per GPU unless the profile says (CPU-only clusters)."""
    return profile.tasks_per_node or profile.gpus_per_node


def executor_parameters(profile: ClusterProfile, nodes: int, job_name: str) -> dict[str, Any]:
    """submitit.SlurmExecutor.update_parameters(**this): one srun task per rank on every node."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": nodes,
        "ntasks_per_node": tasks_per_node(profile),
        "time": profile.time_limit_min,
        "signal_delay_s": profile.signal_lead_s,  # --signal=USR2@lead
        "partition": profile.partition,
        "account": profile.account,
        "qos": profile.qos,
        "gpus_per_node": profile.gpus_per_node or None,
        "cpus_per_task": profile.cpus_per_task,
        "mem": None if profile.mem_gb is None else f"{profile.mem_gb}GB",
        "constraint": profile.constraint,
        "setup": list(profile.setup) or None,
        "srun_args": _srun_args(profile),
        # `scontrol requeue` (ours, after the checkpoint) needs a requeueable job, whatever the cluster's default
        "additional_parameters": {"requeue": True, **{_option(k): v for k, v in profile.sbatch_extra.items()}},
    }
    # wckey stays even when None: submitit would otherwise send its own default
    return {**{k: v for k, v in params.items() if v is not None}, "wckey": profile.wckey}


def _srun_args(profile: ClusterProfile) -> list[str]:
    return [*srun_task_args(profile.cpus_per_task), *profile.srun_args]


# ---------------------------------------------------------------------------------------------------------------
# Facts of every dtrain job step, for `dtrain submit`'s jobs and slurm/sbatch/dtrain.sbatch alike (which asks for
# them with `python -m dtrain_launch.slurm port|srun-args` inside the job)

# Below Linux's ephemeral range (32768-60999 by default), from which the kernel hands out the local ports of
# outgoing connections: a port drawn there can be taken on the first node by the time rank 0 binds it.
PORT_RANGE = range(20000, 32768)


def rendezvous_port(job_id: str, restart_count: int) -> int:
    """The same port on every task of one run, a new one after each requeue (the old run's sockets may linger)."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return PORT_RANGE.start + (int(digits) * 101 + restart_count) % len(PORT_RANGE)


def restart_count(environ: Mapping[str, str]) -> int:
    """How many times Slurm requeued this job (by us or by a preemption)."""
    return int(environ.get("SLURM_RESTART_COUNT", "0"))


def srun_task_args(cpus_per_task: int | None) -> list[str]:
    # One rank dying must end the job at once, not leave the others blocked in a collective until its timeout.
    args = ["--kill-on-bad-exit=1"]
    if cpus_per_task:
        # Since Slurm 22.05 srun no longer inherits the job's --cpus-per-task: without this every rank is bound
        # to a single core.
        args.append(f"--cpus-per-task={cpus_per_task}")
    return args


def python_command(profile: ClusterProfile) -> str:
    return profile.python or shlex.quote(sys.executable)


def sbatch_script(parameters: dict[str, Any], folder: Path, python: str) -> str:
    """The batch script submitit writes for these parameters (its own generator, so this is what sbatch gets)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **parameters)


def log_paths(folder: Path, job_id: str, task: int = 0) -> tuple[Path, Path]:
    from submitit.core.utils import JobPaths

    paths = JobPaths(folder, job_id=job_id, task_id=task)
    return paths.stdout, paths.stderr


# ---------------------------------------------------------------------------------------------------------------
# Submitting, and the record in the run folder


def snapshot_config(config: str | Path, folder: Path) -> Path:
    """Copy the YAML the checks passed on: requeued runs train that, whatever happens to the original later."""
    folder.mkdir(parents=True, exist_ok=True)
    snapshot = folder / f"config-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    shutil.copyfile(config, snapshot)
    return snapshot


def submit(plan: JobPlan, job: Any, profile: ClusterProfile) -> str:
    """sbatch through submitit; returns the Slurm job id."""
    import submitit

    executor = submitit.SlurmExecutor(folder=plan.folder, max_num_timeout=profile.max_requeues, python=profile.python)
    executor.update_parameters(**plan.parameters)
    return executor.submit(job).job_id


def append_record(folder: Path, record: dict[str, Any]) -> None:
    with open(folder / RECORDS, "a") as f:
        f.write(json.dumps(record) + "\n")


def latest_record(run: str | Path) -> dict[str, Any]:
    """The newest submission of a run, given its folder or its config YAML."""
    run_dir = Path(run)
    if run_dir.is_file():
        from dtrain.config import load_config

        run_dir = Path(load_config(run_dir, check_paths=False).output_dir)
    records = run_dir / "slurm" / RECORDS
    if not records.is_file():
        raise ConfigError([f"{run}: no Slurm job recorded ({records} is missing); was it started by dtrain submit?"])
    return json.loads(records.read_text().splitlines()[-1])


def record_for(plan: JobPlan, job_id: str, cfg: Config, workdir: Path, **extra: Any) -> dict[str, Any]:
    """What jobs.jsonl keeps about one submission (extra: config, snapshot, overrides, cluster)."""
    return {
        "job_id": job_id,
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
        "nodes": plan.nodes,
        "tasks_per_node": plan.tasks_per_node,
        "run_dir": str(plan.run_dir),
        "folder": str(plan.folder),
        "checkpoint_dir": str((workdir / cfg.checkpoint_dir).resolve()),
        "tensorboard_dir": str((workdir / cfg.tensorboard_dir).resolve()),
        "metrics": str(plan.run_dir / "metrics.jsonl"),
    }


# ---------------------------------------------------------------------------------------------------------------
# Status and cancel: live state from squeue/scontrol, final state from sacct (needs accounting)


@dataclass
class JobState:
    state: str  # RUNNING, PENDING, COMPLETED, FAILED, ... or UNKNOWN
    detail: str = ""  # elapsed, nodes, reason / exit code, as Slurm gives them
    restarts: int | None = None  # Slurm's requeue count (scontrol, else accounting); None if neither knows


def _slurm(*cmd: str) -> str | None:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def job_state(job_id: str) -> JobState:
    restarts = None
    shown = _slurm("scontrol", "show", "job", "-o", job_id) or ""
    for word in shown.split():
        if word.startswith("Restarts="):
            restarts = int(word.split("=", 1)[1])
    if restarts is None:  # slurmctld forgot the job (MinJobAge): accounting keeps one record per run of it
        runs = _slurm("sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "JobID")
        restarts = len(runs.splitlines()) - 1 if runs else None
    live = _slurm("squeue", "-h", "-j", job_id, "-o", "%T|%M|%N|%r")
    if live:
        state, elapsed, nodes, reason = live.splitlines()[0].split("|")
        detail = f"for {elapsed} on {nodes}" if state == "RUNNING" else f"reason {reason}"
        return JobState(state, detail, restarts)
    final = _slurm("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,Elapsed,ExitCode,NodeList")
    if final:
        state, elapsed, exit_code, nodes = final.splitlines()[-1].split("|")
        return JobState(state.split()[0], f"after {elapsed} on {nodes}, exit code {exit_code}", restarts)
    return JobState("UNKNOWN", "not in the queue, and sacct has no record (no accounting?)", restarts)


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], check=True, timeout=60)


def main(argv: list[str] | None = None) -> int:
    """Inside a job of slurm/sbatch/dtrain.sbatch: `port` prints this run's MASTER_PORT, `srun-args` the options
    its srun needs (from the job's own SLURM_* variables)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="python -m dtrain_launch.slurm", description=main.__doc__)
    parser.add_argument("fact", choices=["port", "srun-args"])
    fact = parser.parse_args(argv).fact
    if fact == "port":
        print(rendezvous_port(os.environ["SLURM_JOB_ID"], restart_count(os.environ)))
    else:
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        print(shlex.join(srun_task_args(int(cpus) if cpus else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
