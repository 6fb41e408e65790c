"""The local launch: `dtrain train` is exactly `torchrun ... -m dtrain.train CONFIG overrides`, nothing more."""

from __future__ import annotations

import os
import sys

from dtrain.hub import RANK_ENV


def torchrun_command(
    config: str, overrides: list[str], nproc: int, python: str = sys.executable
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of a single-node run with `nproc` ranks; `--standalone` picks a free rendezvous port."""
    cmd = [
        python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "dtrain.train", config, *overrides,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", **RANK_ENV)
    return cmd, env


def run(cmd: list[str], env: dict[str, str]) -> None:
    """Become the launcher process, so that signals (Ctrl-C, a scheduler's SIGTERM) reach torchrun directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)
