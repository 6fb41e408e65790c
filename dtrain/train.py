"""Entry point of every rank:  torchrun --nproc_per_node N -m dtrain.train CONFIG.yaml [key.sub=value ...]

`dtrain train` runs this command through torchrun's own launcher; Slurm jobs run it too. Exit code 0: finished;
EXIT_PREEMPTED: stopped early on a preemption/time-limit signal after saving a checkpoint (the launcher requeues;
`dtrain train` exits with it too); anything else: failed.
"""

from __future__ import annotations

import argparse
import sys

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
# Rank 0's last line: `dtrain status` tells a finished run from one stopped early (which Slurm also calls COMPLETED).
OUTCOME_LINE = "dtrain: run {outcome} at step {step} of {total}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrain.train", description=__doc__)
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)

    import os

    from dtrain.config import ConfigError
    from dtrain.preflight import Launch, preflight

    # The launcher ran the same checks; a rank repeats them (cheap: files only) because a Slurm requeue or a hand-run
    # torchrun starts ranks without any launcher, and a config or checkpoint may have changed since.
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    nnodes = max(1, int(os.environ.get("WORLD_SIZE", 1)) // per_node)
    try:
        cfg = preflight(args.config, args.overrides, Launch(nnodes, per_node)).cfg
    except ConfigError as e:
        print(f"dtrain: {e}", file=sys.stderr, flush=True)
        return 2

    from dtrain.dist import compute_init

    env = compute_init(cfg.deepspeed.timeout_minutes)

    from dtrain.checkpoint import CheckpointError
    from dtrain.trainer import Trainer

    try:
        trainer = Trainer(cfg, env)
        result = trainer.fit()
    except CheckpointError as e:
        print(f"dtrain: rank {env.rank}: {e}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as e:  # the checkpoint folder changed between the launcher's check and this rank's
        print(f"dtrain: rank {env.rank}: {e}", file=sys.stderr, flush=True)
        return 2
    if result.preempted:
        from dtrain.preemption import ignore_further_stops

        ignore_further_stops()
    if env.is_main:
        outcome = "stopped (checkpoint saved, resumable)" if result.preempted else "finished"
        print(OUTCOME_LINE.format(outcome=outcome, step=result.progress.step, total=trainer.total_steps), flush=True)
    import torch.distributed as dist

    dist.destroy_process_group()
    if result.preempted:
        return EXIT_PREEMPTED
    if env.is_main and cfg.export.on_finish != "none":
        from dtrain.finish import export_on_finish

        print(f"dtrain: exported {export_on_finish(cfg, cfg.export.on_finish)}", flush=True)
    return 0


if __name__ == "__main__":
    # Under torchrun, an uncaught exception's traceback also goes to the error file torchrun reads, from which
    # `dtrain train` names the failing rank and its error (launch/torchrun.py).
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
