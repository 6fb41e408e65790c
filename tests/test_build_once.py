"""dtrain.build_once, as the universal conversion and the data cache use it: one builder, waiters that stop at once
when it fails and keep waiting, however long, while it is alive. Threads stand in for ranks; no process group.
A builder killed outright is a real `dtrain prepare` / `dtrain reshard` killed with SIGKILL."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dtrain import build_once as module
from dtrain.build_once import BuildFailed, build_once
from dtrain.data.cache import is_complete
from tests.helpers import FULL_OVERRIDES, REPO, dtrain_command, run_dtrain, write_config


def _in_thread(target) -> tuple[threading.Thread, list]:
    """Run target() in a thread; the returned list receives its exception, if any."""
    errors: list = []

    def run():
        try:
            target()
        except Exception as e:
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_a_failed_build_stops_the_waiters_within_seconds(tmp_path):
    final = tmp_path / "universal"

    def build(staging):
        time.sleep(1)
        raise RuntimeError("ds_to_universal: killed (out of memory)")

    builder, builder_errors = _in_thread(lambda: build_once(final, build, is_builder=True))
    started = time.monotonic()
    with pytest.raises(BuildFailed, match="out of memory"):
        build_once(final, build, is_builder=False, grace_s=3600, poll_s=0.1)
    assert time.monotonic() - started < 5
    builder.join(timeout=30)
    assert builder_errors and not final.exists()


def test_a_build_longer_than_the_waiters_patience_completes_while_it_shows_life(tmp_path, monkeypatch):
    """The waiters' limit (grace_s, the collective timeout in the trainer) counts from the builder's last heartbeat,
    not from the start: a conversion of hours is waited for."""
    monkeypatch.setattr(module, "HEARTBEAT_S", 0.2)
    final = tmp_path / "universal"

    def build(staging):
        time.sleep(3)  # 3 x the waiters' grace
        (staging / "done").write_text("ok")

    builder, builder_errors = _in_thread(lambda: build_once(final, build, is_builder=True))
    while not module.staging_folders(final):  # the builder holds its lock and beats
        time.sleep(0.05)
    assert build_once(final, build, is_builder=False, grace_s=1, poll_s=0.1) is True
    builder.join(timeout=30)
    assert (final / "done").read_text() == "ok" and not builder_errors


def test_waiters_go_on_a_moment_after_a_short_build(tmp_path):
    """A small data set builds in about a second while the other ranks wait; rank 0 then waits for the last of them
    in the next collective, so a waiter that looked once a second would add up to a second to every first launch."""
    final, ended = tmp_path / "data", []

    def build(staging):
        time.sleep(1.2)
        (staging / "done").write_text("ok")
        ended.append(time.monotonic())  # the rename follows at once

    builder, builder_errors = _in_thread(lambda: build_once(final, build, is_builder=True))
    assert build_once(final, build, is_builder=False, grace_s=60) is True
    waited_after = time.monotonic() - ended[0]
    builder.join(timeout=30)
    assert not builder_errors and waited_after < 0.5


def test_waiters_give_up_when_no_builder_shows_life(tmp_path):
    with pytest.raises(BuildFailed, match="no process has been building it"):
        build_once(tmp_path / "universal", lambda staging: None, is_builder=False, grace_s=0.5, poll_s=0.1)


# -- a builder killed outright (kill -9, a node lost): its staging folder is removed once its heartbeat is stale ------


def _kill_inside_build(args: list[str], parent: Path, started_work, log: Path) -> Path:
    """Start `dtrain ARGS`, SIGKILL its whole process group (the rank, its tokenizing workers, ds_to_universal: what
    a lost node loses) once `started_work(staging folder in parent)`, and return the staging folder left behind."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            dtrain_command(*args), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while not (staging := [p for p in parent.glob(".tmp-*") if p.is_dir() and started_work(p)]):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the build ended or hung before it could be killed:\n{log.read_text()[-3000:]}")
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return staging[0]


def _age(staging: Path, seconds: float) -> None:
    """As if `seconds` had passed since the killed builder's last heartbeat."""
    then = time.time() - seconds
    for path in (staging / module.HEARTBEAT, staging):
        if path.exists():
            os.utime(path, (then, then))


def _live_builder_elsewhere(final: Path) -> Path:
    """The staging folder of a builder at work on another node: its pid means nothing here, its heartbeat is fresh."""
    staging = final.with_name(f".tmp-{final.name}-node-elsewhere-4242")
    staging.mkdir()
    (staging / module.HEARTBEAT).touch()
    return staging


def test_a_killed_tokenization_leaves_no_staging_folder_once_the_data_is_prepared(tmp_path, tiny_model):
    rows = (REPO / "data/sample/text.jsonl").read_text() * 20  # 8,000 documents: seconds of tokenizing to die in
    (tmp_path / "big.jsonl").write_text(rows)
    config = write_config(tmp_path / "cfg.yaml", tiny_model, **{"data.datasets": [
        {"path": str(tmp_path / "big.jsonl"), "format": "text", "text_field": "text"}]})  # fmt: skip
    cache = tmp_path / ".dtrain-cache"
    tokenizing = lambda staging: time.sleep(0.5) is None  # noqa: E731 - half a second into its 8,000 documents
    killed = _kill_inside_build(["prepare", str(config)], cache, tokenizing, tmp_path / "killed.log")
    _age(killed, module.STALE_S + 60)
    final = cache / killed.name.removeprefix(".tmp-").split("-")[0]
    alive = _live_builder_elsewhere(final)

    report = run_dtrain("prepare", str(config)).stdout
    assert "written in" in report and is_complete(final)
    assert [p.name for p in cache.glob(".tmp-*")] == [alive.name]  # the dead builder's is gone, the live one's kept


@pytest.mark.slow  # a 2-rank reference training, then two conversions through the CLI
def test_a_killed_universal_conversion_leaves_no_staging_folder_once_converted(tmp_path, tiny_model, full_reference):
    source = full_reference(2) / "checkpoints" / "step-00000012"
    checkpoint = tmp_path / "run" / "checkpoints" / source.name
    shutil.copytree(source, checkpoint)
    config = write_config(tmp_path / "cfg.yaml", tiny_model)
    # inside the conversion: ds_to_universal has started writing its output into the staging folder
    reshard = ["reshard", str(config), *FULL_OVERRIDES]
    converting = lambda staging: (staging / "universal").exists()  # noqa: E731
    killed = _kill_inside_build(reshard, checkpoint, converting, tmp_path / "killed.log")
    _age(killed, module.STALE_S + 60)
    alive = _live_builder_elsewhere(checkpoint / "universal")

    assert "converted in" in run_dtrain(*reshard).stdout
    assert (checkpoint / "universal" / "zero").is_dir()
    assert [p.name for p in checkpoint.glob(".tmp-*")] == [alive.name]
