"""Entry point of every rank:  torchrun --nproc_per_node N -m dtrain.train CONFIG.yaml [key.sub=value ...]

`dtrain train` builds exactly this command; Slurm jobs run it too. Exit code 0: finished; EXIT_PREEMPTED: stopped
early on a preemption/time-limit signal after saving a checkpoint (the launcher requeues); anything else: failed.
"""

from __future__ import annotations

import argparse
import sys

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"


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
        result = Trainer(cfg, env).fit()
    except CheckpointError as e:
        print(f"dtrain: rank {env.rank}: {e}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as e:  # the checkpoint folder changed between the launcher's check and this rank's
        print(f"dtrain: rank {env.rank}: {e}", file=sys.stderr, flush=True)
        return 2
    import torch.distributed as dist

    dist.destroy_process_group()
    return EXIT_PREEMPTED if result.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
