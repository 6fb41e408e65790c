"""One process builds a folder, every other process waits for it: without a collective, so an hour of work (data
tokenization, a universal checkpoint conversion) cannot trip a collective timeout.

The builder works in a staging folder beside it, `.tmp-<name>-<host>-<pid>`, under a file lock (two jobs sharing the
folder never build it at once), and publishes it with a rename: a folder that exists under its final name is
complete. While building it touches `.heartbeat` inside the staging folder every few seconds; if it fails it leaves
`<name>.failed` with the error. Waiters return when the folder is complete, raise at once on a fresh failure marker,
keep waiting as long as a heartbeat is fresh however long that takes, and give up only if no builder shows a sign of
life for `grace_s`.

A builder killed outright (kill -9, a node lost) leaves its staging folder behind, at 70B a ~1 TB partial universal
checkpoint. Every later build in the same parent folder, and every checkpoint save (dtrain.checkpoint), removes the
staging folders whose heartbeat is stale. Judged by the heartbeat's age, not by the pid: the builder may be alive on
another node, where that pid means nothing. The folder must be on storage every waiting process sees.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

HEARTBEAT_S = 5.0
# A heartbeat older than this means the builder died. Generous: network file systems cache attributes for tens of
# seconds, and two nodes' clocks differ.
STALE_S = 120.0
HEARTBEAT = ".heartbeat"  # inside the staging folder: removing the folder removes it
_STAGING = re.compile(r"^\.tmp-.+-[^-]+-\d+$")  # `.tmp-<name>-<host>-<pid>`, as _build names them


class BuildFailed(RuntimeError):
    """The builder failed (its error is in the message), or no builder showed a sign of life in time."""


def build_once(
    final: Path,
    build: Callable[[Path], None],
    *,
    is_builder: bool,
    is_complete: Callable[[Path], bool] = Path.is_dir,
    grace_s: float = 1800.0,
    poll_s: float = 1.0,
) -> bool:
    """Make sure `final` is complete: the builder runs `build(tmp_folder)`, the others wait. True if it existed."""
    if is_builder:
        return _build(final, build, is_complete)
    return _wait(final, is_complete, grace_s, poll_s)


def failed_marker(final: Path) -> Path:
    return final.with_name(final.name + ".failed")


def staging_folders(final: Path) -> list[Path]:
    """The staging folders of `final`'s builders: this node's, other nodes', dead ones'."""
    return [p for p in final.parent.glob(f".tmp-{final.name}-*") if _STAGING.match(p.name) and p.is_dir()]


def remove_stale_staging(parent: Path) -> None:
    """Remove the staging folders in `parent` whose builder shows no sign of life for STALE_S: it was killed."""
    if parent.is_dir():
        for staging in parent.iterdir():
            if _STAGING.match(staging.name) and staging.is_dir() and not _alive(staging):
                shutil.rmtree(staging, ignore_errors=True)


def _alive(staging: Path) -> bool:
    """The builder touched its heartbeat (or made the folder: it starts beating a moment later) within STALE_S."""
    newest = 0.0
    for path in (staging, staging / HEARTBEAT):
        try:
            newest = max(newest, path.stat().st_mtime)
        except FileNotFoundError:  # not beating yet, or the folder is gone (published or removed)
            pass
    return time.time() - newest < STALE_S


def _build(final: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> bool:
    remove_stale_staging(final.parent)
    if is_complete(final):
        return True
    final.parent.mkdir(parents=True, exist_ok=True)
    failed_marker(final).unlink(missing_ok=True)
    with FileLock(str(final.with_name(final.name + ".lock"))):
        if is_complete(final):  # another job finished it while we waited for the lock
            return True
        tmp = final.with_name(f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            with _Heartbeat(tmp / HEARTBEAT):
                build(tmp)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            _write_atomic(failed_marker(final), f"{type(e).__name__}: {e}")
            raise
        shutil.rmtree(final, ignore_errors=True)  # only a foreign, incomplete folder can be here
        os.rename(tmp, final)  # the heartbeat is gone; removing it refreshed the folder's own mtime
    return False


def _wait(final: Path, is_complete: Callable[[Path], bool], grace_s: float, poll_s: float) -> bool:
    start = last_alive = time.time()
    while not is_complete(final):
        now = time.time()
        failed = failed_marker(final)
        # A marker older than this wait (minus clock skew between nodes) belongs to an earlier run.
        if failed.is_file() and failed.stat().st_mtime >= start - 60:
            raise BuildFailed(f"building {final} failed: {failed.read_text()}")
        if any(_alive(staging) for staging in staging_folders(final)):
            last_alive = now
        if now - last_alive > grace_s:
            raise BuildFailed(
                f"{final} did not appear and no process has been building it for {grace_s:.0f} s "
                "(is the folder on storage every node sees?)"
            )
        # A tenth of the time waited so far, at most poll_s: a build of a second (a small data set) is noticed
        # within ~0.1 s (the other ranks wait for the late one in their next collective), an hour-long one costs
        # the shared file system one look per poll_s.
        time.sleep(min(poll_s, max(0.01, (now - start) / 10)))
    return True


class _Heartbeat:
    """Touches a file every HEARTBEAT_S seconds from a thread while the builder works; removed at the end, before the
    staging folder is published."""

    def __init__(self, path: Path):
        self.path, self.stop = path, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="build-once-heartbeat")

    def __enter__(self) -> _Heartbeat:
        self.path.touch()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            self.path.touch()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
