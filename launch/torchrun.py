"""The local launch: `dtrain train` is torchrun (torch.distributed.run, its own arguments and agent) with dtrain's
exit codes, running `-m dtrain.train CONFIG overrides` on every rank.

torchrun alone turns any rank's non-zero exit into a crash of its own: a ChildFailedError traceback and exit 1.
That hides a run stopped on SIGTERM after saving (every rank exits EXIT_PREEMPTED). And on SIGTERM torchrun itself
raises SignalException once its 30 s shutdown timeout has sent the ranks SIGTERM and then SIGKILL, which loses
the ranks' codes and can kill a save. Here the stop signals (SIGTERM, SIGUSR2) are forwarded to the ranks instead,
the agent waits for them as for any exit, and the result becomes one exit code: 0 finished, EXIT_PREEMPTED when
every rank stopped resumably, else the failing rank's code with that rank and the end of its error named (ranks
record uncaught exceptions in torchrun's error files, dtrain/train.py). SIGINT (Ctrl-C) stays torchrun's: stop
now, no save.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from dtrain.hub import RANK_ENV
from dtrain.train import EXIT_PREEMPTED

# torchrun's default less SIGTERM, which main() forwards to the ranks (with SIGUSR2) instead of tearing them down.
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
ERROR_TAIL_LINES = 3  # of a failed rank's traceback: the failing line and the exception


def torchrun_command(
    config: str, overrides: list[str], nproc: int, python: str = sys.executable
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of a single-node run with `nproc` ranks; `--standalone` picks a free rendezvous port."""
    cmd = [
        python, "-m", "dtrain_launch.torchrun", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "dtrain.train", config, *overrides,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", **RANK_ENV)
    return cmd, env


def run(cmd: list[str], env: dict[str, str]) -> None:
    """Become the launcher process, so that signals (Ctrl-C, a scheduler's SIGTERM) reach it directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)


def main(argv: list[str] | None = None) -> int:
    """torchrun with `argv`; returns dtrain's exit code for the run (see the module docstring)."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The agent logs "failed (exitcode: N) local_rank: ..." for any non-zero exit, EXIT_PREEMPTED included;
    # outcome() says what happened instead.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_not_the_failed_line)
    args = torchrun.parse_args([f"--signals-to-handle={TORCHRUN_SIGNALS}", *(sys.argv[1:] if argv is None else argv)])
    from dtrain.preemption import STOP_SIGNALS

    for stop in STOP_SIGNALS:  # SIGUSR2 too: torchrun would die of it (its default action)
        signal.signal(stop, _forward_to_ranks)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        code, report = outcome({rank: (f.exitcode, f.error_file_data) for rank, f in e.failures.items()})
        if report:
            print(f"dtrain train: {report}", file=sys.stderr, flush=True)
        return code
    return 0


def _not_the_failed_line(record: logging.LogRecord) -> bool:
    return not record.msg.startswith("failed (exitcode")


def _forward_to_ranks(signum: int, frame) -> None:
    """The ranks are this process's children (torchrun starts each in a session of its own). Before any has
    started there is nothing to save: the launch stops, as it would have without the forwarding."""
    import psutil

    ranks = psutil.Process().children()
    if not ranks:
        raise SystemExit(128 + signum)
    for rank in ranks:
        try:
            rank.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def outcome(failures: dict[int, tuple[int, dict]]) -> tuple[int, str]:
    """(exit code, what to tell the user) from {global rank: (exit code, torchrun error-file data)} of the ranks
    that did not exit 0, in the order torchrun saw them end (it stops the others once one fails). All
    EXIT_PREEMPTED: a stopped, resumable run (rank 0 said so). Otherwise the first failed rank's code (128 + signal
    when one killed it) and a report naming it and the end of its traceback; the other ranks' ends follow."""
    crashed = [rank for rank, (code, _) in failures.items() if code != EXIT_PREEMPTED]
    if not crashed:
        return EXIT_PREEMPTED, ""
    first = crashed[0]
    exitcode, error = failures[first]
    lines = [f"rank {first} failed: {_describe(exitcode)}"]
    tail = _traceback(error).strip().splitlines()[-ERROR_TAIL_LINES:]
    lines += [f"  {line}" for line in tail] or ["  (no traceback recorded: see the rank's own output above)"]
    others = [f"rank {rank} {_describe(code)}" for rank, (code, _) in sorted(failures.items()) if rank != first]
    if others:
        lines.append(f"then: {'; '.join(others)}")
    return (exitcode if exitcode > 0 else 128 - exitcode), "\n".join(lines)


def _describe(exitcode: int) -> str:
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return "stopped (checkpoint saved)" if exitcode == EXIT_PREEMPTED else f"exit code {exitcode}"


def _traceback(error: dict) -> str:
    """The traceback a rank's `record` wrapper wrote (torch.distributed.elastic's error-file layout), or ''."""
    message = error.get("message")
    return message.get("extraInfo", {}).get("py_callstack", "") if isinstance(message, dict) else ""


if __name__ == "__main__":
    sys.exit(main())
