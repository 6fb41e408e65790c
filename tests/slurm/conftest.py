"""Fixtures for tests that need a real Slurm: the cluster of slurm/testcluster/start, with 2 nodes (each in its own
network, UTS and mount namespace; DTRAIN_TESTCLUSTER_NODES=1 for a single node). Jobs of one node run on dtnode1.

`slurm_cluster` (session): starts the cluster (installing Slurm on first use; needs root), sets
os.environ["SLURM_CONF"], and stops it at the end of the session unless it was already running before (then it
is left as found) or DTRAIN_TESTCLUSTER_KEEP=1.
`submitit_executor` (function): a factory for submitit AutoExecutors on that cluster, each with a fresh folder under
tmp_path (job ids restart at 1 on a fresh state dir; a reused folder could return an old result) and with
PYTHONPATH set so job functions in tests/slurm/*.py and the repository import inside the job.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
START = REPO / "slurm" / "testcluster" / "start"
STOP = REPO / "slurm" / "testcluster" / "stop"

# job modules in this directory must import in the test process too, whatever pytest's import mode
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@dataclass
class SlurmTestCluster:
    state_dir: Path
    slurm_conf: Path
    env: dict[str, str]  # what to add to a subprocess environment (SLURM_CONF, DTRAIN_TESTCLUSTER_DIR)
    start_seconds: float
    accounting: bool  # slurmdbd running: sacct works, so submitit sees jobs that die without a result
    nodes: int  # compute nodes
    partitions: tuple[str, ...] = ("debug", "urgent")  # urgent (PriorityTier 10) preempts debug (REQUEUE)
    started_here: bool = field(default=True)

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> str:
        """Run a Slurm client command (squeue, sacct, scontrol ...) against this cluster; return stdout."""
        out = subprocess.run(
            list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout, check=check
        )
        return out.stdout

    def job_state(self, job_id: str) -> str:
        """State from squeue (live, no accounting needed); '' once the job left the queue."""
        return self.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False).strip()


def _cluster_up(state_dir: Path) -> bool:
    conf = state_dir / "etc" / "slurm.conf"
    if not conf.exists() or shutil.which("scontrol") is None:
        return False
    r = subprocess.run(
        ["scontrol", "ping"], env={**os.environ, "SLURM_CONF": str(conf)}, capture_output=True, text=True, timeout=15
    )
    return r.returncode == 0 and "UP" in r.stdout


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmTestCluster]:
    state_dir = Path(os.environ.get("DTRAIN_TESTCLUSTER_DIR", "/tmp/dtrain-testcluster"))
    was_up = _cluster_up(state_dir)
    t0 = time.monotonic()
    if os.geteuid() != 0:
        # starting needs root; a cluster started with sudo serves jobs of any user (slurmd runs as root)
        if not was_up:
            pytest.skip("the Slurm test cluster needs root to start: sudo slurm/testcluster/start (or run as root)")
        env = {"SLURM_CONF": str(state_dir / "etc" / "slurm.conf"), "DTRAIN_TESTCLUSTER_DIR": str(state_dir)}
    else:
        proc = subprocess.run(
            [str(START), "--nodes", os.environ.get("DTRAIN_TESTCLUSTER_NODES", "2")],
            env={**os.environ, "DTRAIN_TESTCLUSTER_DIR": str(state_dir)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            pytest.fail(f"slurm/testcluster/start failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
        env = {}
        for line in proc.stdout.splitlines():
            if line.startswith("export ") and "=" in line:
                k, v = line[len("export ") :].split("=", 1)
                env[k] = v
    start_s = time.monotonic() - t0
    conf = Path(env["SLURM_CONF"])
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    accounting = "AccountingStorageType=accounting_storage/slurmdbd" in conf.read_text()
    nodes = conf.read_text().count("\nNodeName=")
    print(
        f"\n[slurm_cluster] start took {start_s:.1f} s ({nodes} nodes, up before: {was_up}, accounting: {accounting})"
    )
    cluster = SlurmTestCluster(state_dir, conf, env, start_s, accounting, nodes, started_here=not was_up)
    try:
        yield cluster
    finally:
        if cluster.started_here and os.environ.get("DTRAIN_TESTCLUSTER_KEEP") != "1":
            t0 = time.monotonic()
            subprocess.run([str(STOP)], env={**os.environ, **env}, stdin=subprocess.DEVNULL, timeout=300)
            print(f"\n[slurm_cluster] stop took {time.monotonic() - t0:.1f} s")
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def submitit_executor(slurm_cluster, tmp_path):
    """Factory: submitit_executor(**params) -> submitit.AutoExecutor on the test cluster (fresh folder per call)."""
    import submitit

    count = 0
    pythonpath = os.pathsep.join(p for p in (str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")) if p)

    def make(**params) -> submitit.AutoExecutor:
        nonlocal count
        count += 1
        ex = submitit.AutoExecutor(folder=tmp_path / f"submitit{count}", cluster="slurm")
        defaults = dict(
            timeout_min=30,  # >= 5 (USR2@90 must not beat the handler), > 10 (else each USR2 counts as a timeout)
            slurm_partition="debug",
            slurm_setup=[f"export PYTHONPATH={pythonpath}", "export OMP_NUM_THREADS=1"],
        )
        ex.update_parameters(**{**defaults, **params})
        return ex

    return make
