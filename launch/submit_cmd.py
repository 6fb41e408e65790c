"""`dtrain submit | status | cancel`: a run as one Slurm job (see slurm/README.md).

    dtrain submit CONFIG [key.sub=value ...] --cluster slurm/clusters/h100.yaml --nodes 4 [--dry-run]
    dtrain status RUN        # RUN: the run folder (output_dir) or the config
    dtrain cancel RUN

`add_submit_parsers(subparsers)` registers the three in the `dtrain` command.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from dtrain_launch.validate import cuda_problems, fit_report, ops_report

from dtrain.config import ConfigError


def add_submit_parsers(subparsers: argparse._SubParsersAction) -> None:
    submit = subparsers.add_parser("submit", help="validate, then run the config as one Slurm job (submitit)")
    submit.add_argument("config", help="run config YAML")
    submit.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    submit.add_argument("--cluster", required=True, help="cluster profile YAML (slurm/clusters/*.yaml)")
    submit.add_argument("--nodes", type=int, default=None, help="nodes (default: the profile's nodes)")
    submit.add_argument("--dry-run", action="store_true", help="validate and print the sbatch script; submit nothing")
    submit.add_argument("--allow-no-fit", action="store_true", help="submit even if the memory check says no fit")
    submit.set_defaults(handler=cmd_submit)

    status = subparsers.add_parser("status", help="state of a run's Slurm job: queue, requeues, step, checkpoint")
    status.add_argument("run", help="run folder (output_dir) or its config YAML")
    status.set_defaults(handler=cmd_status)

    cancel = subparsers.add_parser(
        "cancel", help="scancel a run's Slurm job (the ranks save at the next step if in time)"
    )
    cancel.add_argument("run", help="run folder (output_dir) or its config YAML")
    cancel.set_defaults(handler=cmd_cancel)


def cmd_submit(args: argparse.Namespace) -> int:
    from dtrain_launch import slurm
    from dtrain_launch.slurm_job import TrainJob
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from dtrain.preflight import Launch, preflight

    # Everything is checked before anything reaches sbatch: the config (as `dtrain check`), the profile, the
    # batch arithmetic for this many ranks, and where the run would start from.
    profile = slurm.load_profile(args.cluster)
    nodes = profile.nodes if args.nodes is None else args.nodes
    checked = preflight(args.config, args.overrides, Launch(nodes, slurm.tasks_per_node(profile), local=False))
    cfg, layout = checked.cfg, checked.resume.layout
    workdir = Path.cwd()
    plan = slurm.plan_job(cfg, profile, args.nodes, workdir)
    cuda = cuda_problems(profile.setup)
    if cuda:
        raise ConfigError(cuda, args.cluster)
    start = checked.resume.describe()
    fit = fit_report(cfg, layout, slurm.hardware(profile, plan.nodes)) or [
        "not checked (the profile gives no gpu_mem / node_mem)"
    ]
    print(
        f"{args.config}: OK: {cfg.strategy}, ZeRO-{cfg.deepspeed.stage}, {plan.nodes} node(s) x "
        f"{plan.tasks_per_node} ranks = {plan.world_size}; global batch {layout.global_batch_size} = micro "
        f"{layout.micro_batch_size} x accumulation {layout.gradient_accumulation_steps} x {layout.world_size}"
    )
    print(f"  start         {start}")
    print(f"  memory        {fit[0]}")
    ops = ops_report(cfg, "cuda" if profile.gpus_per_node else "cpu")
    print(f"  ds ops        {ops[0] if ops else 'none compiled'}")
    for line in ops[1:]:
        print(f"                {line}")
    if fit[0] != "fits" and fit[1:] and not args.allow_no_fit:
        raise ConfigError([f"memory: the run cannot fit: {'; '.join(fit[1:])} (--allow-no-fit to submit anyway)"])
    storage = slurm.storage_problems(cfg, profile, plan.nodes, workdir)
    if storage:
        raise ConfigError(storage)
    _refuse_if_active(plan.folder)
    if args.dry_run:
        print(slurm.sbatch_script(plan.parameters, plan.folder, slurm.python_command(profile)), end="")
        return 0
    snapshot = slurm.snapshot_config(args.config, plan.folder)
    job = TrainJob(str(snapshot), args.overrides, str(workdir), profile.max_requeues)
    try:
        job_id = slurm.submit(plan, job, profile)
    except (OSError, subprocess.SubprocessError, FailedJobError, FailedSubmissionError) as e:
        print(f"dtrain submit: sbatch failed: {e}", file=sys.stderr)
        return 1
    record = slurm.record_for(
        plan, job_id, cfg, workdir,
        config=str(Path(args.config).resolve()), snapshot=str(snapshot), overrides=args.overrides,
        cluster=str(Path(args.cluster).resolve()),
    )  # fmt: skip
    slurm.append_record(plan.folder, record)
    _print_submitted(plan, profile, record)
    return 0


def _refuse_if_active(folder: Path) -> None:
    """Two jobs of one run would write the same checkpoints: one at a time."""
    from dtrain_launch import slurm

    try:
        job_id = slurm.latest_record(folder.parent)["job_id"]
    except ConfigError:  # never submitted
        return
    state = slurm.job_state(job_id).state
    if state in slurm.ACTIVE_STATES:
        raise ConfigError([f"output_dir: job {job_id} of this run is {state}; wait for it or dtrain cancel it first"])


def _shown(path: Path) -> str:
    """A path as the user would type it: relative below the current folder, else absolute."""
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def _print_submitted(plan, profile, record: dict) -> None:
    from dtrain_launch.slurm import log_paths

    job_id, folder = record["job_id"], plan.folder
    out0, err0 = log_paths(folder, job_id, 0)
    run = _shown(plan.run_dir)
    print(
        f"submitted Slurm job {job_id} ({plan.job_name}): {plan.nodes} node(s) x {plan.tasks_per_node} tasks, "
        f"time limit {profile.time_limit_min} min, SIGUSR2 {profile.signal_lead_s} s before it, "
        f"at most {profile.max_requeues} requeues"
    )
    print(f"  run folder    {plan.run_dir}")
    print(f"  logs          {folder}/{job_id}_<rank>_log.out|err (rank 0: {out0.name}, {err0.name})")
    print(f"  sbatch script {folder}/{job_id}_submission.sh")
    print(f"  checkpoints   {record['checkpoint_dir']}")
    print(f"  tensorboard   {record['tensorboard_dir']}")
    print(f"  follow        tail -f {out0}")
    print(f"                tensorboard --logdir {record['tensorboard_dir']}")
    print(f"                dtrain status {run}   |   dtrain cancel {run}")


def cmd_status(args: argparse.Namespace) -> int:
    from dtrain_launch import slurm

    record = slurm.latest_record(args.run)
    job_id, folder = record["job_id"], Path(record["folder"])
    state = slurm.job_state(job_id)
    out0, err0 = slurm.log_paths(folder, job_id, 0)
    log = _read(out0).splitlines()
    requeues = [line for line in log if line.startswith(slurm.REQUEUE_LINE)]
    restarts = "" if state.restarts is None else f"; Slurm restarts {state.restarts}"
    print(f"job {job_id}: {state.state} {state.detail}{restarts}; requeued by dtrain {len(requeues)} time(s)")
    print(f"  run           {_outcome(state.state, log, _srun_errors(err0))}")
    print(f"  submitted     {record['submitted']}: {record['config']} on {record['cluster']}")
    print(f"  progress      {_last_step(Path(record['metrics']))}")
    print(f"  checkpoint    {_newest_checkpoint(Path(record['checkpoint_dir']))}")
    print(f"  logs          {out0} (rank 0; {folder}/{job_id}_<rank>_log.out|err)")
    print(f"  tensorboard   {record['tensorboard_dir']}")
    for line in requeues:
        print(f"  {line}")
    return 0


def _outcome(state: str, log: list[str], srun_errors: list[str]) -> str:
    """What became of the training in the job's latest run. Slurm says COMPLETED for a run that finished and for
    one that stopped early on SIGTERM after saving; rank 0's last line tells them apart."""
    from dtrain_launch.slurm import ACTIVE_STATES, RUN_START_LINE

    from dtrain.train import OUTCOME_LINE

    if state in ACTIVE_STATES:
        return "in progress (running, or queued to resume)"
    starts = [i for i, line in enumerate(log) if line.startswith(RUN_START_LINE)]
    latest = log[starts[-1] :] if starts else log
    pattern = re.compile(OUTCOME_LINE.format(outcome="(.+)", step=r"(\d+)", total=r"(\d+)"))  # no other specials
    ends = [m for m in map(pattern.fullmatch, latest) if m]
    if ends:
        outcome, step, total = ends[-1].groups()
        if outcome == "finished":
            return f"finished: {step}/{total} steps"
        return f"stopped early at step {step}/{total} with a checkpoint, not requeued; resumable: submit it again"
    if srun_errors:
        return f"died: {srun_errors[0]}; resubmit to resume from the last complete checkpoint"
    return f"ended ({state}) without finishing; resubmit to resume from the last complete checkpoint"


def _srun_errors(batch_err: Path) -> list[str]:
    """srun's own reports of dead tasks in the batch script's stderr, first death first: 'rank 2-3 on dtnode2:
    Killed'. srun numbers tasks as dtrain numbers ranks."""
    found = re.findall(r"^srun: error: (\S+): tasks? ([\d,-]+): (.+)$", _read(batch_err), re.M)
    return [f"rank {tasks} on {node}: {what}" for node, tasks, what in found]


def cmd_cancel(args: argparse.Namespace) -> int:
    from dtrain_launch import slurm

    job_id = slurm.latest_record(args.run)["job_id"]
    slurm.cancel(job_id)
    print(f"cancelled Slurm job {job_id} (scancel: SIGTERM, the ranks save at the next step boundary if in time)")
    return 0


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _last_step(metrics: Path) -> str:
    from dtrain.metrics import read_metrics

    losses = read_metrics(metrics.parent)
    if not losses:
        return "no step logged yet"
    step = max(losses)
    return f"step {step}, loss {losses[step]:.4f}"


def _newest_checkpoint(directory: Path) -> str:
    from dtrain.checkpoint import complete_checkpoints

    found = complete_checkpoints(directory)
    return str(found[-1]) if found else f"none yet in {directory}"
