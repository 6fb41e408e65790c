"""Smoke tests of the test Slurm (slurm/testcluster) driven through submitit, and a multi-node torchrun by hand
across its two nodes.

Run: pytest tests/slurm -v -s   (as root; the session fixture installs/starts the cluster and stops it at the end)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
from slurm_helpers import job_logs, wait_done, wait_for
from testcluster_jobs import SleepUntilCheckpointed, gloo_allreduce, sleep_then_return

from dtrain.metrics import read_metrics
from tests.helpers import FULL_OVERRIDES, FULL_STEPS, write_config

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


def _timing(name: str, seconds: float) -> None:
    print(f"\n[timing] {name}: {seconds:.1f} s")


def test_cluster_is_up(slurm_cluster):
    out = slurm_cluster.run("sinfo", "-h", "-o", "%P|%t|%c")
    parts = {p.rstrip("*"): (state, int(cpus)) for p, state, cpus in (line.split("|") for line in out.split())}
    assert set(parts) == {"debug", "urgent"}, out
    assert all(state in ("idle", "mix", "alloc") for state, _ in parts.values()), out
    assert parts["debug"][1] >= 2, out
    _timing("cluster start (fixture)", slurm_cluster.start_seconds)


def test_two_task_gloo_allreduce(submitit_executor):
    ex = submitit_executor(slurm_ntasks_per_node=2, name="allreduce")
    t0 = time.monotonic()
    job = ex.submit(gloo_allreduce)
    wait_done(job, timeout=120)
    _timing("submit -> done, 2-task gloo all_reduce", time.monotonic() - t0)
    results = job.results()
    assert len(results) == 2, job_logs(job)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in results), results
    assert len({(r["master_addr"], r["master_port"]) for r in results}) == 1, results


def test_interrupt_checkpoints_and_requeues(submitit_executor, slurm_cluster, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    ex = submitit_executor(name="requeue")
    t0 = time.monotonic()
    job = ex.submit(SleepUntilCheckpointed(str(markers)))
    # the function runs only after submitit installed its signal handlers, so interrupting after this is safe
    wait_for(lambda: (markers / "started.1").exists(), 120, "first run to start")
    _timing("submit -> running (requeue test)", time.monotonic() - t0)

    t_int = time.monotonic()
    job._interrupt()  # SIGTERM then USR2, as on preemption: submitit calls checkpoint() and requeues
    wait_for(lambda: (markers / "checkpointed").exists(), 60, "checkpoint() to run")
    _timing("interrupt -> checkpoint() ran", time.monotonic() - t_int)
    wait_for(lambda: (markers / "started.2").exists(), 120, "the requeued job to run again")
    _timing("interrupt -> requeued -> running again", time.monotonic() - t_int)
    wait_done(job, timeout=60)
    _timing("interrupt -> done", time.monotonic() - t_int)

    result = job.result()
    assert result["checkpointed"] is True, result
    assert result["runs"] == 2, result
    assert result["restart_count"] >= 1, result


def test_sacct_sees_job_cancelled_before_result(submitit_executor, slurm_cluster, tmp_path):
    """Without accounting (sacct) submitit cannot tell that a job died without writing its result."""
    if not slurm_cluster.accounting:
        pytest.skip("cluster runs without slurmdbd (DTRAIN_TESTCLUSTER_ACCOUNTING=0)")
    marker = tmp_path / "started"
    job = submitit_executor(name="cancelled").submit(sleep_then_return, 600, str(marker))
    wait_for(marker.exists, 120, "job to start")
    t0 = time.monotonic()
    job.cancel()
    wait_done(job, timeout=60)
    _timing("scancel -> submitit sees the job done (sacct)", time.monotonic() - t0)
    assert job.state.startswith("CANCELLED"), job.state
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()


def test_urgent_partition_preempts_debug(submitit_executor, slurm_cluster, tmp_path):
    """A job in `urgent` (higher PriorityTier) preempts a running `debug` job, which Slurm requeues and reruns."""
    cpus = int(slurm_cluster.run("sinfo", "-h", "-p", "debug", "-o", "%c").split()[0])
    whole = dict(cpus_per_task=cpus, nodes=slurm_cluster.nodes)  # every CPU of every node: nothing else fits
    marker = tmp_path / "low-started"
    low = submitit_executor(name="low", **whole).submit(
        # a preempted submitit job ignores SIGTERM: a first run shorter than KillWait (5 s) would finish anyway
        sleep_then_return,
        1,
        str(marker),
        first_run_seconds=300,
    )
    wait_for(marker.exists, 120, "debug job to start")
    marker.unlink()
    t0 = time.monotonic()
    high = submitit_executor(name="high", slurm_partition="urgent", **whole).submit(sleep_then_return, 1)
    wait_done(high, timeout=120)
    _timing("urgent submit -> done (preempting the debug job)", time.monotonic() - t0)
    wait_for(marker.exists, 120, "preempted debug job to run again")
    _timing("urgent submit -> preempted debug job running again", time.monotonic() - t0)
    wait_done(low, timeout=120)
    assert high.results()[0]["restart_count"] == 0  # results(): one per task, i.e. per node here
    assert low.results()[0]["restart_count"] >= 1, job_logs(low)


@pytest.mark.slow
@pytest.mark.long
def test_torchrun_by_hand_across_two_nodes(slurm_cluster, tiny_model, full_reference, tmp_path):
    """The README's multi-node command, one torchrun per node (slurm/testcluster/on runs it inside the node's
    namespaces): the c10d rendezvous on dtnode1 crosses the nodes' network; the losses are a 4-rank run's."""
    if slurm_cluster.nodes < 2:
        pytest.skip("needs the 2-node test cluster")
    config = write_config(tmp_path / "cfg.yaml", tiny_model)
    env = {**os.environ, **slurm_cluster.env, "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                str(REPO / "slurm" / "testcluster" / "on"),
                f"dtnode{node + 1}",
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=2",
                "--rdzv_backend=c10d",
                "--rdzv_endpoint=dtnode1:29411",
                "-m",
                "dtrain.train",
                str(config),
                *FULL_OVERRIDES,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in range(2)
    ]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    _timing("torchrun on 2 nodes x 2 ranks, by hand", time.monotonic() - t0)
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    got, want = read_metrics(tmp_path / "run"), read_metrics(full_reference(2))
    assert sorted(got) == list(range(1, FULL_STEPS + 1))
    assert all(got[step] == pytest.approx(want[step], rel=1e-5) for step in got), (got, want)
