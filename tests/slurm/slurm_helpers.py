"""Test-side helpers for the Slurm tests (imported by the test process only)."""

from __future__ import annotations

import time
from pathlib import Path


def wait_done(job, timeout: float, poll: float = 0.5) -> float:
    """Wait until a submitit job is done (result file written, or a final state in sacct); return the seconds.

    job.result()/results() can wait forever (a job that died without a result, no accounting); this fails instead,
    with the tails of the job's stdout and stderr.
    """
    t0 = time.monotonic()
    while not job.done(force_check=True):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"job {job.job_id} not done after {timeout} s (state {job.state})\n{job_logs(job)}")
        time.sleep(poll)
    return time.monotonic() - t0


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2) -> float:
    """Poll predicate() until true; return the seconds it took, or raise TimeoutError naming `what`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - t0


def job_logs(job, tail: int = 3000) -> str:
    def read(p: Path) -> str:
        try:
            return p.read_text()[-tail:]
        except OSError:
            return "<missing>"

    out, err = job.paths.stdout, job.paths.stderr
    return f"--- stdout {out}:\n{read(out)}\n--- stderr {err}:\n{read(err)}"
