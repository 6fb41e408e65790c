"""`dtrain train` on this machine: what a user sees when a run is stopped or crashes, through the real CLI on the
tiny model with 2 gloo ranks. A run stopped by SIGTERM saves and exits EXIT_PREEMPTED (75) with no traceback from
torchrun; a crashed run exits non-zero naming the rank that failed and the end of its error (~2 min each here)."""

from __future__ import annotations

import signal
import time

import pytest

from dtrain.train import EXIT_PREEMPTED
from tests.helpers import REPO, last_logged_step, run_dtrain, start_dtrain, write_config


@pytest.mark.slow
def test_sigterm_stops_resumably_with_its_own_exit_code(tmp_path, tiny_model):
    config = write_config(
        tmp_path / "cfg.yaml", tiny_model, **{"train.max_steps": 1000, "checkpoint.every_steps": 1000}
    )
    log = tmp_path / "train.log"
    launcher = start_dtrain("train", str(config), "--nproc", "2", log=log)
    try:
        deadline = time.monotonic() + 500
        while last_logged_step(tmp_path / "run") < 1 and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        launcher.send_signal(signal.SIGTERM)  # what a scheduler or `kill` sends the process the user started
        code = launcher.wait(timeout=300)
    finally:
        launcher.kill()
    output = log.read_text()
    assert code == EXIT_PREEMPTED, output[-6000:]
    assert "dtrain: run stopped (checkpoint saved, resumable)" in output
    assert "Traceback" not in output and "failed (exitcode" not in output, output[-6000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))  # the save it resumes from


@pytest.mark.slow
def test_a_crashed_run_names_the_failing_rank_and_its_error(tmp_path, tiny_model):
    rows = (REPO / "data/sample/text.jsonl").read_text().splitlines()[:20]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([*rows, '{"text": 5}']) + "\n")  # line 21: found when rank 0 tokenizes, in the run
    config = write_config(tmp_path / "cfg.yaml", tiny_model, **{"data.datasets": [{"path": str(data)}]})
    proc = run_dtrain("train", str(config), "--nproc", "2", check=False)
    assert proc.returncode == 1, proc.stderr[-6000:]
    report = proc.stderr[proc.stderr.rindex("dtrain train: ") :]
    assert report.startswith("dtrain train: rank 0 failed: exit code 1\n"), report
    assert f"DataError: {data}:21: field 'text' must be a string, got int" in report
    assert "ChildFailedError" not in proc.stderr
