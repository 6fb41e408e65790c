"""`dtrain submit | status | cancel` on the real test Slurm (slurm/testcluster, 2 nodes in their own namespaces),
and the parts that need no Slurm.

On the cluster (marked slurm; the session fixture starts it): a tiny ZeRO-3 run on 2 nodes x 2 ranks trains to
completion with the losses of a 4-rank run on one machine, every rank on its node and CPU; the same run interrupted
the way preemption does it (once before training starts, once mid-run) saves one checkpoint on both nodes, is
requeued and resumes to the losses of the uninterrupted run, with the time of each phase printed; a run stopped by
SIGTERM alone shows as stopped early, a node lost mid-run fails the job naming the ranks and node, and a resubmit on
one node resumes from the last complete checkpoint through the universal path; a job whose rank crashes fails with
the traceback in its log and is not requeued; cancel.
Without Slurm: config and profile errors are reported before anything reaches sbatch; the sbatch script for the
example H100 profile matches tests/slurm/golden/; the rendezvous port range. (The stop signal the ranks agree on:
tests/test_preemption.py.)

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
    RUN_START_LINE,
    executor_parameters,
    load_profile,
    plan_job,
    python_command,
    sbatch_script,
)
from slurm_helpers import wait_for

from dtrain.checkpoint import STATE_FILE, complete_checkpoints
from dtrain.config import ConfigError, load_config
from dtrain.metrics import read_metrics
from tests.helpers import FULL_OVERRIDES, FULL_STEPS, REPO, last_logged_step, run_dtrain, write_config

HERE = Path(__file__).resolve().parent
TEST_PROFILE = REPO / "slurm" / "clusters" / "testcluster.yaml"
H100_PROFILE = REPO / "slurm" / "clusters" / "h100.yaml"
GOLDEN = HERE / "golden" / "h100-llama3-70b-4nodes.sbatch"
FAULTS = HERE / "faults"  # sitecustomize.py: DTRAIN_TEST_CRASH=RANK:STEP makes that rank raise at that step;
# DTRAIN_TEST_TIMELINE=1 makes every rank print the time of each phase of a stop
FAULTS_PATH = {"PYTHONPATH": os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)}
WORLD_TOLERANCE = 1e-5  # relative, per step loss, between runs on different world sizes (test_resume_world_size)


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


def assert_losses_close(got: Path, expected: Path, steps: range | list[int]) -> None:
    for key in ("train/loss", "eval/loss"):
        have, want = read_metrics(got, key), read_metrics(expected, key)
        assert set(steps) & set(want) <= set(have), (key, sorted(have))
        for step in set(steps) & set(want):
            assert have[step] == pytest.approx(want[step], rel=WORLD_TOLERANCE), (key, step)


def kill_ranks_on_node(job_id: str, node_index: int) -> list[int]:
    """SIGKILL every task of the job's step on one node (SLURM_NODEID), as if that node died; returns the pids."""
    killed = []
    for proc in Path("/proc").iterdir():
        try:
            env = dict(line.split("=", 1) for line in (proc / "environ").read_text().split("\0") if "=" in line)
            cmdline = (proc / "cmdline").read_text()
        except (OSError, ValueError):
            continue
        if (env.get("SLURM_JOB_ID"), env.get("SLURM_NODEID")) == (job_id, str(node_index)) and (
            "submitit.core._submit" in cmdline
        ):
            os.kill(int(proc.name), 9)
            killed.append(int(proc.name))
    return killed


def rank_lines(job: Submitted, world: int) -> dict[int, re.Match]:
    """rank -> the `dtrain: rank R of W on HOST, node-local rank L, CPUs [...], torch threads T` line of its log."""
    pattern = re.compile(r"^dtrain: rank (\d+) of (\d+) on (\S+), node-local rank (\d+), CPUs \[([\d, ]*)\], "
                         r"torch threads (\d+)$", re.M)  # fmt: skip
    return {rank: pattern.search(job.log_text(rank)) for rank in range(world)}


def timeline(job: Submitted, world: int, since: float) -> dict[str, float]:
    """Phases of the first stop after `since`, in seconds, from the `dtrain-timeline:` marks of every rank's log
    (see faults/sitecustomize.py) and submitit's start line of the requeued run."""
    marks: dict[int, list[tuple[str, float]]] = {}
    for rank in range(world):
        found = re.findall(r"^dtrain-timeline: (\S+) ([\d.]+)$", job.log_text(rank), re.M)
        marks[rank] = [(event, float(t)) for event, t in found if float(t) >= since]

    def first(event: str, rank: int = 0, after: float = since) -> float:
        return next(t for e, t in marks[rank] if e == event and t >= after)

    t = {name: first(name) for name in ("shards-written", "prune-begin", "prune-done", "requeue-asked",
                                        "requeue-done", "resumed")}  # fmt: skip
    t["renamed"] = max(x for e, x in marks[0] if e == "renamed" and x <= t["prune-begin"])
    t["all-stopped"] = max(first("stop-agreed", rank) for rank in range(world))
    t["all-saved"] = max(first("save-done", rank) for rank in range(world))
    started = re.findall(r"^submitit INFO \((\S+ \S+)\) - Starting with", job.log_text(0), re.M)
    restarts = [time.mktime(time.strptime(s.split(",")[0], "%Y-%m-%d %H:%M:%S")) for s in started]
    t["running-again"] = next(r for r in restarts if r >= int(t["requeue-done"]))
    return {
        "signal -> every rank at the step boundary, stop agreed (finish step)": t["all-stopped"] - since,
        "save: every rank writes and fsyncs its own files, DeepSpeed's barrier": t["shards-written"]
        - max(first("save-begin", r) for r in range(world)),
        "metadata, fsync of folders, rename, fsync parent (rank 0)": t["renamed"] - t["shards-written"],
        "prune in the step path (rename away; deletion in the background)": t["prune-done"] - t["prune-begin"],
        "final barrier (all ranks done saving)": t["all-saved"] - t["prune-done"],
        "requeue (scontrol requeue by rank 0)": t["requeue-done"] - t["requeue-asked"],
        "requeued -> running again (Slurm, 1 s resolution)": t["running-again"] - t["requeue-done"],
        "running again -> checkpoint loaded (start-up + load)": t["resumed"] - t["running-again"],
        "signal -> resumed, total": t["resumed"] - since,
    }


# ---------------------------------------------------------------------------------------------------------------
# On the test cluster


@pytest.fixture(scope="module")
def finished_run(slurm_cluster, tiny_model, tmp_path_factory) -> Submitted:
    """An uninterrupted tiny ZeRO-3 run submitted with `dtrain submit` on every node of the test cluster, 2 ranks per
    node, waited for until it left the queue."""
    job = submit_tiny(tmp_path_factory.mktemp("submit-finished"), tiny_model, "--nodes", str(slurm_cluster.nodes))
    _timing(f"submit -> job done (uninterrupted run, {slurm_cluster.nodes} nodes)", wait_gone(slurm_cluster, job, 600))
    return job


@pytest.mark.slurm
def test_submit_trains_to_completion(finished_run, slurm_cluster, full_reference):
    job, run, nodes = finished_run, finished_run.run_dir, slurm_cluster.nodes
    world = 2 * nodes
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
    assert all("Job completed successfully" in job.log_text(rank) for rank in range(world))

    # every rank ran where Slurm put it: 2 per node, each bound to its own CPU (cpus_per_task 1) and using it alone;
    # the rendezvous crossed the nodes' network to the first node
    lines = rank_lines(job, world)
    hosts = {}
    for rank, line in lines.items():
        assert line, (rank, job.log_text(rank))
        assert (int(line[1]), int(line[2]), int(line[4]), int(line[6])) == (rank, world, rank % 2, 1), line[0]
        assert len(line[5].split(",")) == 1, line[0]
        hosts.setdefault(line[3], set()).add(line[5])
    assert len(hosts) == nodes and all(len(cpus) == 2 for cpus in hosts.values()), hosts  # distinct CPUs per node
    assert f"rendezvous {sorted(hosts)[0]}:" in job.log_text(0)

    # the losses of a run on one machine (torchrun, 2 ranks: the same global batch, summed in another order)
    assert_losses_close(run, full_reference(2), range(1, FULL_STEPS + 1))

    # the batch script submitit wrote is the one the pure functions (and the golden test) produce
    cfg = load_config(run.parent / "cfg.yaml", FULL_OVERRIDES)
    profile = load_profile(TEST_PROFILE)
    plan = plan_job(cfg, profile, nodes, REPO)
    expected = sbatch_script(plan.parameters, plan.folder, python_command(profile))
    assert (job.folder / f"{job.job_id}_submission.sh").read_text() == expected

    status = dtrain("status", str(run))
    assert status.returncode == 0, status.stderr
    assert f"job {job.job_id}: COMPLETED" in status.stdout and f"step {FULL_STEPS}," in status.stdout, status.stdout
    assert f"finished: {FULL_STEPS}/{FULL_STEPS} steps" in status.stdout and str(final) in status.stdout

    # resubmitted on another node count, the run is checked as a resume on that world size, global batch kept
    other = 1 if nodes > 1 else 2
    dry = dtrain("submit", str(run.parent / "cfg.yaml"), *FULL_OVERRIDES, "--cluster", str(TEST_PROFILE),
                 "--nodes", str(other), "--dry-run")  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert f"resume from {final}" in dry.stdout
    assert f"saved on {world} ranks, resumed on {2 * other}: global batch 8 kept" in dry.stdout


@pytest.mark.slurm
def test_interrupted_job_saves_requeues_and_resumes_to_equal_losses(finished_run, slurm_cluster, tiny_model, tmp_path):
    """Interrupted as preemption does it (SIGTERM then SIGUSR2 to every task, what submitit's own tests do): once
    before training started (submitit requeues at once), once mid-run (all ranks on both nodes save one checkpoint
    at the same step boundary, rank 0 requeues, the older checkpoint is pruned). Prints the time of each phase of the
    second stop."""
    nodes, world = slurm_cluster.nodes, 2 * slurm_cluster.nodes
    timeline_env = {"DTRAIN_TEST_TIMELINE": "1", **FAULTS_PATH}
    job = submit_tiny(tmp_path, tiny_model, "checkpoint.keep_last=1", "--nodes", str(nodes), env=timeline_env)
    interrupt = submitit.SlurmJob(folder=job.folder, job_id=job.job_id)._interrupt

    wait_for(lambda: RUN_START_LINE in job.log_text(0), 300, "the job to start")
    interrupt()  # the model is still loading: submitit's own handler requeues at once
    wait_for(lambda: REQUEUE_LINE in job.log_text(0), 120, "rank 0 to requeue before training")
    wait_for(lambda: last_logged_step(job.run_dir) >= 5, 400, "the requeued job to log step 5 (step 4 saved)")
    t_interrupt = time.time()
    interrupt()
    wait_for(lambda: job.log_text(0).count(REQUEUE_LINE) == 2, 120, "rank 0 to save and requeue")
    _timing("interrupt -> checkpoint saved, requeue requested", time.time() - t_interrupt)
    # one checkpoint, written by the ranks of both nodes together; step 4 pruned (keep_last 1)
    saved = complete_checkpoints(job.run_dir / "checkpoints")
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) >= 5, saved
    assert len(list((saved[0] / "rng").glob("rank-*.safetensors"))) == world
    assert len(list((saved[0] / "ds").glob("*optim_states.pt"))) == world
    wait_for(lambda: "resumed from" in job.log_text(0), 300, "the requeued job to resume")
    _timing("interrupt -> requeued job resumed from the checkpoint", time.time() - t_interrupt)
    wait_gone(slurm_cluster, job, timeout=400)
    _timing("interrupt -> requeued job done", time.time() - t_interrupt)
    for phase, seconds in timeline(job, world, t_interrupt).items():
        print(f"\n[timing] timeline: {phase}: {seconds:.3f} s")

    info = scontrol_job(slurm_cluster, job.job_id)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "2"), job.log_text(0, "err")
    log = job.log_text(0)
    requeues = [line for line in log.splitlines() if line.startswith(REQUEUE_LINE)]
    assert requeues == [f"{REQUEUE_LINE} (requeue 1 of at most 3): training had not started, nothing to save",
                        f"{REQUEUE_LINE} (requeue 2 of at most 3): checkpoint saved"], requeues  # fmt: skip
    stopped = re.findall(r"^saved (\S+/step-(\d{8}))$", log[: log.index(requeues[1])], re.M)[-1]
    step = int(stopped[1])
    assert stopped[0] == str(saved[0]) and 5 <= step < FULL_STEPS, log  # stopped mid-run, at a step boundary
    assert f"resumed from {stopped[0]} at step {step}" in log
    assert log.count("Job completed successfully") == 1

    # the same losses (train and eval) as the run nobody interrupted
    for key in ("train/loss", "eval/loss"):
        assert read_metrics(job.run_dir, key) == read_metrics(finished_run.run_dir, key), key

    status = dtrain("status", str(job.run_dir))
    assert "requeued by dtrain 2 time(s)" in status.stdout and "Slurm restarts 2" in status.stdout, status.stdout
    assert f"finished: {FULL_STEPS}/{FULL_STEPS} steps" in status.stdout, status.stdout


@pytest.mark.slurm
@pytest.mark.long
def test_urgent_partition_preempts_a_two_node_run_which_resumes_to_equal_losses(
    finished_run, slurm_cluster, tiny_model, tmp_path
):
    """Preempted by Slurm itself, no signal sent by the test: a job in `urgent` (PriorityTier 10) needs every CPU of
    every node, so Slurm preempts the running `debug` job (PreemptMode=REQUEUE: SIGTERM to every task, SIGKILL after
    KillWait 5 s, requeued by Slurm). The ranks of both nodes save at the next step boundary; when the urgent job is
    done the rerun resumes from that checkpoint to the uninterrupted run's losses."""
    nodes = slurm_cluster.nodes
    job = submit_tiny(tmp_path, tiny_model, "--nodes", str(nodes))
    wait_for(lambda: last_logged_step(job.run_dir) >= 5, 400, "the job to log step 5")
    cpus = int(slurm_cluster.run("sinfo", "-h", "-p", "debug", "-o", "%c").split()[0])
    urgent = slurm_cluster.run("sbatch", "--parsable", "-p", "urgent", "-N", str(nodes), f"--cpus-per-task={cpus}",
                               "-o", str(tmp_path / "urgent.out"), "--wrap", "sleep 1").strip()  # fmt: skip
    t0 = time.monotonic()
    wait_for(lambda: "resumed from" in job.log_text(0), 300, f"the preempted job to resume\n{job.log_text(0)}")
    _timing("urgent submitted -> preempted job resumed", time.monotonic() - t0)
    wait_gone(slurm_cluster, job, timeout=400)

    assert scontrol_job(slurm_cluster, urgent)["JobState"] == "COMPLETED"
    info = scontrol_job(slurm_cluster, job.job_id)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    log = job.log_text(0)
    first_run, rerun = log.split("resumed from", 1)
    stopped = re.findall(r"^saved (\S+/step-(\d{8}))$", first_run, re.M)[-1]
    assert 5 <= int(stopped[1]) < FULL_STEPS, first_run  # saved mid-run, at a step boundary, on SIGTERM
    assert rerun.startswith(f" {stopped[0]} at step {int(stopped[1])}"), rerun[:300]
    assert REQUEUE_LINE not in log  # Slurm requeued it: dtrain does so only on SIGUSR2
    for key in ("train/loss", "eval/loss"):
        assert read_metrics(job.run_dir, key) == read_metrics(finished_run.run_dir, key), key


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.long
def test_stopped_early_then_node_lost_then_resumed_on_one_node(finished_run, slurm_cluster, tiny_model, tmp_path):
    """One run folder, three jobs: stopped by SIGTERM alone (Slurm: COMPLETED; status: stopped early, resumable);
    resubmitted on 2 nodes, where the second node does not see that checkpoint yet (a stale file-system view) and
    still resumes from rank 0's choice, and its ranks SIGKILLed after a checkpoint (FAILED, status names them);
    resubmitted on 1 node: resumes from the newest complete checkpoint through the universal path, and ends with
    the losses of the uninterrupted 2-node run within the world-size tolerance."""
    if slurm_cluster.nodes < 2:
        pytest.skip("needs the 2-node test cluster")
    ckpts = tmp_path / "run" / "checkpoints"
    job = submit_tiny(tmp_path, tiny_model, "--nodes", "2")
    wait_for(lambda: last_logged_step(job.run_dir) >= 2, 400, "the job to log step 2")
    slurm_cluster.run("scancel", "--signal=TERM", job.job_id)  # SIGTERM alone: stop, no requeue
    wait_gone(slurm_cluster, job, timeout=300)
    info = scontrol_job(slurm_cluster, job.job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), info
    stopped = complete_checkpoints(ckpts)[-1]
    step = int(stopped.name.split("-")[1])
    status = dtrain("status", str(job.run_dir)).stdout
    assert f"stopped early at step {step}/{FULL_STEPS} with a checkpoint, not requeued; resumable" in status, status

    job = submit_tiny(tmp_path, tiny_model, "--nodes", "2", env={"DTRAIN_TEST_STALE_VIEW": "1", **FAULTS_PATH})
    assert f"resume from {stopped} (step {step}," in job.output
    wait_for(lambda: (ckpts / "step-00000004" / STATE_FILE).is_file() and last_logged_step(job.run_dir) >= 5, 400,
             "a checkpoint at step 4 and step 5 logged")  # fmt: skip
    assert len(kill_ranks_on_node(job.job_id, 1)) == 2
    _timing("SIGKILL of node 2's ranks -> job gone", wait_gone(slurm_cluster, job, timeout=120))
    assert scontrol_job(slurm_cluster, job.job_id)["JobState"] == "FAILED"
    status = dtrain("status", str(job.run_dir)).stdout
    assert "died: rank 2-3 on dtnode2: Killed; resubmit to resume" in status, status
    newest = complete_checkpoints(ckpts)[-1]

    job = submit_tiny(tmp_path, tiny_model, "--nodes", "1")
    assert f"resume from {newest}" in job.output and "universal checkpoint converted once at start" in job.output
    _timing("resubmit on 1 node -> done (universal conversion)", wait_gone(slurm_cluster, job, timeout=400))
    log = job.log_text(0)
    assert f"resumed from {newest} at step" in log and "(universal checkpoint)" in log, log
    assert scontrol_job(slurm_cluster, job.job_id)["JobState"] == "COMPLETED"
    assert sorted(read_metrics(job.run_dir)) == list(range(1, FULL_STEPS + 1))
    assert_losses_close(job.run_dir, finished_run.run_dir, range(1, FULL_STEPS + 1))


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

    # a multi-node run whose checkpoints or data cache would be node-local (the profile says which folders are)
    local = "/tmp/dtrain-testcluster/local"
    placed = [f"checkpoint.dir={local}/ckpt", f"data.cache_dir={local}/cache"]
    node_local = dtrain("submit", str(config), *FULL_OVERRIDES, *placed, "--cluster", str(TEST_PROFILE), "--nodes", "2",
                        env=env)  # fmt: skip
    assert node_local.returncode == 2, node_local.stdout + node_local.stderr
    assert f"checkpoint.dir: {local}/ckpt is node-local on this cluster" in node_local.stderr, node_local.stderr
    assert f"data.cache_dir: {local}/cache is node-local" in node_local.stderr and "output_dir" not in node_local.stderr
    assert "must be on shared storage for 2 nodes" in node_local.stderr

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


def test_rendezvous_port_is_below_the_ephemeral_range_and_new_after_a_requeue():
    from dtrain_launch.slurm import rendezvous_port

    ports = {(job, restart): rendezvous_port(str(job), restart) for job in range(1, 3000) for restart in range(3)}
    assert all(20000 <= port < 32768 for port in ports.values())  # Linux hands out 32768-60999 itself
    assert all(ports[job, 0] != ports[job, 1] for job in range(1, 3000))


def test_wckey_comes_from_the_profile(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("tasks_per_node: 2\nwckey: llm-team\n")
    params = executor_parameters(load_profile(profile), 1, "x")
    assert "#SBATCH --wckey=llm-team\n" in sbatch_script(params, tmp_path, "python")
    # by default none is sent (submitit's own default `submitit` is refused where wckeys are checked)
    assert "--wckey" not in sbatch_script(executor_parameters(load_profile(TEST_PROFILE), 1, "x"), tmp_path, "python")


def test_status_tells_finished_from_stopped_early_and_names_dead_ranks():
    from dtrain_launch.submit_cmd import _outcome

    start = f"{RUN_START_LINE} 7 on dtnode1: 4 ranks"
    stopped = "dtrain: run stopped (checkpoint saved, resumable) at step 9 of 30"
    finished = "dtrain: run finished at step 30 of 30"
    assert _outcome("COMPLETED", [start, stopped], []).startswith("stopped early at step 9/30 with a checkpoint")
    assert _outcome("COMPLETED", [start, stopped, start, finished], []) == "finished: 30/30 steps"
    # a requeued run that died later is not taken for the earlier run that stopped
    died = _outcome("FAILED", [start, stopped, start], ["rank 2-3 on dtnode2: Killed"])
    assert died.startswith("died: rank 2-3 on dtnode2: Killed; resubmit"), died
    assert _outcome("RUNNING", [start], []).startswith("in progress")
