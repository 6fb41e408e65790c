"""`dtrain submit | status | cancel` on the real single-node test Slurm (slurm/testcluster), and the parts that need
no Slurm.

On the cluster (marked slurm; the session fixture starts it): a tiny 2-rank ZeRO-3 run trains to completion as a
Slurm job; a job interrupted the way preemption does it saves, is requeued and resumes to the losses of the
uninterrupted run; a job whose rank crashes fails with the traceback in its log and is not requeued; cancel.
Without Slurm: config and profile errors are reported before anything reaches sbatch; the sbatch script for the
example H100 profile matches tests/slurm/golden/. (The stop signal the ranks agree on: tests/test_preemption.py.)

Run: pytest tests/slurm/test_submit.py -v -s   (prints a [timing] line per phase)
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import submitit
from dtrain_launch.slurm import (
    REQUEUE_LINE,
    executor_parameters,
    load_profile,
    plan_job,
    python_command,
    sbatch_script,
)
from slurm_helpers import wait_for

from dtrain.config import ConfigError, load_config
from dtrain.metrics import read_metrics
from tests.helpers import FULL_OVERRIDES, FULL_STEPS, REPO, last_logged_step, run_dtrain, write_config

HERE = Path(__file__).resolve().parent
TEST_PROFILE = REPO / "slurm" / "clusters" / "testcluster.yaml"
H100_PROFILE = REPO / "slurm" / "clusters" / "h100.yaml"
GOLDEN = HERE / "golden" / "h100-llama3-70b-4nodes.sbatch"
FAULTS = HERE / "faults"  # sitecustomize.py: DTRAIN_TEST_CRASH=RANK:STEP makes that rank raise at that step


def _timing(name: str, seconds: float) -> None:
    print(f"\n[timing] {name}: {seconds:.1f} s")


def dtrain(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real `dtrain` CLI in a fresh process; the caller checks the exit code."""
    return run_dtrain(*args, env=env, timeout=timeout, check=False)


@dataclass
class Submitted:
    job_id: str
    run_dir: Path
    output: str  # what `dtrain submit` printed
    shown: dict[str, str]  # "checkpoints" -> path, ... as printed
    submitted_at: float

    @property
    def folder(self) -> Path:
        return self.run_dir / "slurm"

    def log(self, rank: int = 0, kind: str = "out") -> Path:
        return self.folder / f"{self.job_id}_{rank}_log.{kind}"

    def log_text(self, rank: int = 0, kind: str = "out") -> str:
        try:
            return self.log(rank, kind).read_text(errors="replace")
        except OSError:
            return ""


def submit_tiny(root: Path, tiny_model: Path, *extra: str, env: dict[str, str] | None = None) -> Submitted:
    config = write_config(root / "cfg.yaml", tiny_model)
    t0 = time.monotonic()
    proc = dtrain("submit", str(config), *FULL_OVERRIDES, *extra, "--cluster", str(TEST_PROFILE), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _timing("dtrain submit (validate + sbatch)", time.monotonic() - t0)
    job_id = re.search(r"^submitted Slurm job (\d+)", proc.stdout, re.M).group(1)
    shown = dict(re.findall(r"^  (\w[\w ]*?)\s{2,}(\S.*)$", proc.stdout, re.M))
    return Submitted(job_id, root / "run", proc.stdout, shown, time.monotonic())


def wait_gone(cluster, job: Submitted, timeout: float) -> float:
    """Until the job left the queue (finished, failed, cancelled; a requeued job stays in it while pending)."""
    return wait_for(
        lambda: cluster.job_state(job.job_id) == "", timeout, f"job {job.job_id} to end\n{job.log_text(0, 'err')}"
    )


def scontrol_job(cluster, job_id: str) -> dict[str, str]:
    """JobState, Restarts, ExitCode ... from slurmctld (it keeps finished jobs for MinJobAge = 300 s)."""
    out = cluster.run("scontrol", "show", "job", "-o", job_id)
    return dict(word.split("=", 1) for word in out.split() if "=" in word)


# ---------------------------------------------------------------------------------------------------------------
# On the test cluster


@pytest.fixture(scope="module")
def finished_run(slurm_cluster, tiny_model, tmp_path_factory) -> Submitted:
    """An uninterrupted tiny 2-rank ZeRO-3 run submitted with `dtrain submit`, waited for until it left the queue."""
    job = submit_tiny(tmp_path_factory.mktemp("submit-finished"), tiny_model)
    _timing("submit -> job done (uninterrupted run)", wait_gone(slurm_cluster, job, timeout=300))
    return job


@pytest.mark.slurm
def test_submit_trains_to_completion(finished_run, slurm_cluster):
    job, run = finished_run, finished_run.run_dir
    info = scontrol_job(slurm_cluster, job.job_id)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "0", "0:0"), job.log_text(0, "err")

    # what the output said is where things are
    assert job.shown["run folder"] == str(run)
    assert job.shown["checkpoints"] == str(run / "checkpoints")
    assert job.shown["tensorboard"] == str(run / "tensorboard")
    assert job.shown["follow"] == f"tail -f {job.log(0)}"
    final = run / "checkpoints" / f"step-{FULL_STEPS:08d}"
    assert (final / "trainer_state.json").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(read_metrics(run)) == list(range(1, FULL_STEPS + 1))
    assert f"saved {final}" in job.log_text(0)
    assert "Job completed successfully" in job.log_text(0) and "Job completed successfully" in job.log_text(1)

    # the batch script submitit wrote is the one the pure functions (and the golden test) produce
    cfg = load_config(run.parent / "cfg.yaml", FULL_OVERRIDES)
    profile = load_profile(TEST_PROFILE)
    plan = plan_job(cfg, profile, None, REPO)
    expected = sbatch_script(plan.parameters, plan.folder, python_command(profile))
    assert (job.folder / f"{job.job_id}_submission.sh").read_text() == expected

    status = dtrain("status", str(run))
    assert status.returncode == 0, status.stderr
    assert f"job {job.job_id}: COMPLETED" in status.stdout and f"step {FULL_STEPS}," in status.stdout, status.stdout
    assert str(final) in status.stdout

    # resubmitted on another node count, the run is checked as a resume on that world size, global batch kept
    dry = dtrain("submit", str(run.parent / "cfg.yaml"), *FULL_OVERRIDES, "--cluster", str(TEST_PROFILE),
                 "--nodes", "2", "--dry-run")  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert f"resume from {final}" in dry.stdout and "saved on 2 ranks, resumed on 4: global batch 8 kept" in dry.stdout


@pytest.mark.slurm
def test_interrupted_job_saves_requeues_and_resumes_to_equal_losses(finished_run, slurm_cluster, tiny_model, tmp_path):
    job = submit_tiny(tmp_path, tiny_model)
    t0 = job.submitted_at
    wait_for(lambda: last_logged_step(job.run_dir) >= 2, 300, "the job to log step 2")
    t_interrupt = time.monotonic()
    _timing("submit -> step 2 logged", t_interrupt - t0)
    # what submitit's own tests do to simulate preemption: SIGTERM, then SIGUSR2, to every task
    submitit.SlurmJob(folder=job.folder, job_id=job.job_id)._interrupt()

    wait_for(lambda: REQUEUE_LINE in job.log_text(0), 120, "rank 0 to save and requeue")
    _timing("interrupt -> checkpoint saved, requeue requested", time.monotonic() - t_interrupt)
    wait_for(lambda: "resumed from" in job.log_text(0), 240, "the requeued job to resume")
    _timing("interrupt -> requeued job resumed from the checkpoint", time.monotonic() - t_interrupt)
    wait_gone(slurm_cluster, job, timeout=300)
    _timing("interrupt -> requeued job done", time.monotonic() - t_interrupt)

    info = scontrol_job(slurm_cluster, job.job_id)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), job.log_text(0, "err")
    log = job.log_text(0)
    before_requeue = log[: log.index(REQUEUE_LINE)]
    saved = re.findall(r"^saved (\S+/step-(\d{8}))$", before_requeue, re.M)[-1]
    step = int(saved[1])
    assert 2 <= step < FULL_STEPS, log  # stopped mid-run, at a step boundary
    assert f"resumed from {saved[0]} at step {step}" in log
    assert log.count("Job completed successfully") == 1

    # the same losses (train and eval) as the run nobody interrupted
    for key in ("train/loss", "eval/loss"):
        assert read_metrics(job.run_dir, key) == read_metrics(finished_run.run_dir, key), key

    status = dtrain("status", str(job.run_dir))
    assert "requeued by dtrain 1 time(s)" in status.stdout and "Slurm restarts 1" in status.stdout, status.stdout


@pytest.mark.slurm
def test_second_submit_refused_while_running_and_cancel(slurm_cluster, tiny_model, tmp_path):
    job = submit_tiny(tmp_path, tiny_model)
    again = dtrain("submit", str(tmp_path / "cfg.yaml"), "--cluster", str(TEST_PROFILE))
    assert again.returncode == 2 and f"job {job.job_id} of this run is" in again.stderr, again.stderr

    cancelled = dtrain("cancel", str(tmp_path / "cfg.yaml"))  # a run is named by its folder or its config
    assert cancelled.returncode == 0 and f"cancelled Slurm job {job.job_id}" in cancelled.stdout, cancelled.stderr
    wait_gone(slurm_cluster, job, timeout=120)
    info = scontrol_job(slurm_cluster, job.job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info


@pytest.mark.slurm
def test_crashing_rank_fails_the_job_with_traceback_and_no_requeue(slurm_cluster, tiny_model, tmp_path):
    pythonpath = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
    job = submit_tiny(tmp_path, tiny_model, env={"DTRAIN_TEST_CRASH": "1:2", "PYTHONPATH": pythonpath})
    _timing("submit -> crashed job gone", wait_gone(slurm_cluster, job, timeout=300))

    err = job.log_text(1, "err")
    assert "Traceback (most recent call last)" in err and "injected crash on rank 1 at step 2" in err, err
    info = scontrol_job(slurm_cluster, job.job_id)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    time.sleep(6)  # longer than a requeue takes to show (cred_expire 5 s): it stays failed
    assert slurm_cluster.job_state(job.job_id) == ""
    assert scontrol_job(slurm_cluster, job.job_id)["Restarts"] == "0"
    assert REQUEUE_LINE not in job.log_text(0)


# ---------------------------------------------------------------------------------------------------------------
# No Slurm needed


def test_config_error_is_reported_before_anything_reaches_sbatch(tiny_model, tmp_path):
    spy = tmp_path / "bin"
    spy.mkdir()
    (spy / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/sbatch-was-called\nexit 1\n")
    (spy / "sbatch").chmod(0o755)
    env = {"PATH": f"{spy}{os.pathsep}{os.environ['PATH']}"}
    config = write_config(tmp_path / "cfg.yaml", tiny_model)

    bad_config = dtrain(
        "submit", str(config), "train.lr=fast", "train.bogus=1", "--cluster", str(TEST_PROFILE), env=env
    )
    assert bad_config.returncode == 2, bad_config.stdout + bad_config.stderr
    assert "2 problem(s)" in bad_config.stderr
    assert "train.lr: expected a number" in bad_config.stderr and "train.bogus: unknown key" in bad_config.stderr

    profile = tmp_path / "bad-profile.yaml"
    profile.write_text("gpus_per_node: 8\ntasks_per_node: 4\nsignal_lead_s: 99999\nsbatch_extra: {nodes: 2}\n")
    bad_profile = dtrain("submit", str(config), "--cluster", str(profile), env=env)
    assert bad_profile.returncode == 2, bad_profile.stdout + bad_profile.stderr
    for key in ("tasks_per_node:", "signal_lead_s:", "sbatch_extra.nodes:"):
        assert key in bad_profile.stderr, bad_profile.stderr

    uneven = dtrain("submit", str(config), *FULL_OVERRIDES, "train.global_batch_size=6", "--cluster",
                    str(TEST_PROFILE), "--nodes", "2", env=env)  # fmt: skip
    assert uneven.returncode == 2 and "train.global_batch_size" in uneven.stderr, uneven.stderr

    assert not (tmp_path / "sbatch-was-called").exists()
    assert not (tmp_path / "run").exists()  # no snapshot, no submitit folder


@pytest.mark.parametrize("path", sorted((REPO / "slurm" / "clusters").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_profiles_load(path):
    profile = load_profile(path)
    assert executor_parameters(profile, 2, "x")["ntasks_per_node"] >= 1


def test_profile_problems_are_all_listed_with_their_keys(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("partition: 3\nwalltime: 10\ngpus_per_node: 0\ntime_limit_min: 1\nsbatch_extra: {signal: x}\n")
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    keys = sorted(p.split(":")[0] for p in e.value.problems)
    assert keys == ["partition", "sbatch_extra.signal", "signal_lead_s", "tasks_per_node", "walltime"], e.value


def test_sbatch_script_for_the_example_h100_profile_matches_golden():
    cfg = load_config(REPO / "configs" / "llama3-70b-full-zero3-offload.yaml", check_paths=False)
    profile = load_profile(H100_PROFILE)
    plan = plan_job(cfg, profile, 4, Path("/shared/dtrain"))
    text = sbatch_script(plan.parameters, plan.folder, python_command(profile))
    if os.environ.get("DTRAIN_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), f"regenerate with DTRAIN_UPDATE_GOLDEN=1 if intended:\n{text}"
