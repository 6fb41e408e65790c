"""dtrain.build_once, as the universal conversion and the data cache use it: one builder, waiters that stop at once
when it fails and keep waiting, however long, while it is alive. Threads stand in for ranks; no process group."""

from __future__ import annotations

import threading
import time

import pytest

from dtrain import build_once as module
from dtrain.build_once import BuildFailed, build_once


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
    while not module.heartbeat_file(final).exists():  # the builder holds its lock and beats
        time.sleep(0.05)
    assert build_once(final, build, is_builder=False, grace_s=1, poll_s=0.1) is True
    builder.join(timeout=30)
    assert (final / "done").read_text() == "ok" and not builder_errors


def test_waiters_give_up_when_no_builder_shows_life(tmp_path):
    with pytest.raises(BuildFailed, match="no process has been building it"):
        build_once(tmp_path / "universal", lambda staging: None, is_builder=False, grace_s=0.5, poll_s=0.1)
