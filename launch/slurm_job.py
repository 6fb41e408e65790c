"""What runs inside every Slurm task of a `dtrain submit` job: one task is one rank.

srun starts one task per GPU on every node; submitit unpickles a `TrainJob` in each and calls it. The task takes
its rank, world size and rendezvous (first node of the job, a port derived from the job id) from Slurm's
environment and runs `dtrain.train.main` in its own process, exactly as torchrun's workers do.

Preemption and time limits (`--signal=USR2@lead`, or submitit's `job._interrupt()`):
- submitit installs its USR2 handler first. It would checkpoint() and `scontrol requeue` at once, from inside the
  handler, before any rank has saved. The trainer's StopFlag replaces it on every rank once training starts, and
  only records the signal; the handler is kept here and called later.
- All ranks agree on the signal at the next step boundary, save one complete checkpoint together and return
  EXIT_PREEMPTED. Then, outside any signal handler and after every collective, rank 0 alone calls submitit's
  handler: our checkpoint() returns a fresh TrainJob (no model is pickled: the requeued job resumes from the
  checkpoint on disk), submitit writes it, requeues the job and exits. The other ranks just return.
- Only SIGUSR2 requeues. SIGTERM alone is scancel, or a preemption Slurm requeues by itself: the ranks still save
  at the next step boundary if they get there in time, and the job is not requeued by us.
- Requeues are bounded by the profile's max_requeues; each one is printed in rank 0's log (by checkpoint(), which
  both paths call), where `dtrain status` counts them.
A USR2 before training started (model still loading) reaches submitit's handler directly: rank 0 requeues at once,
which loses nothing since no step has been taken since the last checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket

import submitit
from dtrain_launch.slurm import REQUEUE_LINE, RUN_START_LINE, rendezvous_port, restart_count
from submitit.core.job_environment import SignalHandler

from dtrain.hub import RANK_ENV


def export_rank_environment() -> submitit.helpers.TorchDistributedEnvironment:
    """MASTER_ADDR (first node of SLURM_JOB_NODELIST), MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE."""
    job = submitit.JobEnvironment()
    os.environ["MASTER_PORT"] = str(rendezvous_port(job.job_id, restart_count(os.environ)))
    # CUDA_VISIBLE_DEVICES is left alone: every task sees the node's GPUs and dtrain.dist picks cuda:LOCAL_RANK.
    return submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


class TrainJob(submitit.helpers.Checkpointable):
    """The submitit callable: a config path, overrides, where to run, and how many times we requeued so far."""

    def __init__(self, config: str, overrides: list[str], workdir: str, max_requeues: int, requeues: int = 0):
        self.config = config
        self.overrides = list(overrides)
        self.workdir = workdir
        self.max_requeues = max_requeues
        self.requeues = requeues
        self._saved = False  # set once the ranks saved after SIGUSR2: what checkpoint() reports

    def __call__(self) -> dict:
        from dtrain.preemption import stopped_by
        from dtrain.train import EXIT_PREEMPTED
        from dtrain.train import main as train_main

        os.chdir(self.workdir)  # relative paths in the config resolve where `dtrain submit` validated them
        os.environ.update(RANK_ENV)  # before dtrain.train imports huggingface_hub, which reads it once
        submitit_requeue = signal.getsignal(signal.SIGUSR2)  # before the trainer's StopFlag replaces it
        env = export_rank_environment()
        if env.rank == 0:
            print(
                f"{RUN_START_LINE} {os.environ.get('SLURM_JOB_ID')} on {socket.gethostname()}: {env.world_size} ranks, "
                f"rendezvous {env.master_addr}:{env.master_port}; Slurm restarts {restart_count(os.environ)}, "
                f"requeues by dtrain {self.requeues} of at most {self.max_requeues}",
                flush=True,
            )
        print(describe_rank(env.rank, env.world_size, env.local_rank), flush=True)
        code = train_main([self.config, *self.overrides])
        if code == 0:
            return {"status": "finished", "rank": env.rank}
        if code != EXIT_PREEMPTED:
            raise RuntimeError(f"dtrain.train exited with code {code} on rank {env.rank}")
        signum = stopped_by()
        result = {"status": "stopped", "rank": env.rank, "signal": signum.name if signum else None}
        if env.rank != 0 or signum != signal.SIGUSR2:
            return result
        self._requeue(submitit_requeue)
        return result  # not reached: submitit's handler exits after requeueing

    def _requeue(self, submitit_requeue) -> None:
        if self.requeues >= self.max_requeues:
            raise RuntimeError(
                f"checkpoint saved after SIGUSR2, but the job is not requeued: it was requeued {self.requeues} "
                f"times already (max_requeues {self.max_requeues}); resubmit to continue from the checkpoint"
            )
        if not isinstance(getattr(submitit_requeue, "__self__", None), SignalHandler):
            raise RuntimeError("checkpoint saved after SIGUSR2, but this is not a submitit job: cannot requeue")
        self._saved = True
        # submitit: calls checkpoint() below, writes the new submission, `scontrol requeue`, then exits
        submitit_requeue(signal.SIGUSR2, None)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission | None:
        """A fresh job with the same config: nothing but paths and a counter is pickled. None (no requeue, the job
        ends) once max_requeues is reached; submitit also calls this when USR2 comes before training started."""
        if self.requeues >= self.max_requeues:
            print(f"dtrain: not requeued: max_requeues {self.max_requeues} reached", flush=True)
            return None
        why = "checkpoint saved" if self._saved else "training had not started, nothing to save"
        print(f"{REQUEUE_LINE} (requeue {self.requeues + 1} of at most {self.max_requeues}): {why}", flush=True)
        fresh = TrainJob(self.config, self.overrides, self.workdir, self.max_requeues, self.requeues + 1)
        return submitit.helpers.DelayedSubmission(fresh)


def describe_rank(rank: int, world_size: int, local_rank: int) -> str:
    """Where a rank runs: host, place on the node and the CPUs Slurm bound it to (and the torch threads it uses)."""
    from dtrain.dist import rank_threads

    cpus = sorted(os.sched_getaffinity(0))
    return (
        f"dtrain: rank {rank} of {world_size} on {socket.gethostname()}, node-local rank {local_rank}, "
        f"CPUs {cpus}, torch threads {rank_threads(os.environ)}"
    )
