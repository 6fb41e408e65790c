"""Disk full while saving: a clear error, the previous checkpoint intact, and the run resumable from it."""

from __future__ import annotations

import subprocess

import pytest

from dtrain.checkpoint import complete_checkpoints
from dtrain.metrics import read_metrics
from tests.helpers import FULL_OVERRIDES, run_dtrain, write_config

pytestmark = pytest.mark.slow  # 2-rank trainings through the CLI


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs: room for one checkpoint of the tiny model (1.8 MB) but not two."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(
    tmp_path, tiny_model, small_fs, full_reference
):
    config = write_config(tmp_path / "cfg.yaml", tiny_model, **{"checkpoint.dir": str(small_fs / "ckpt")})
    failed = run_dtrain("train", str(config), *FULL_OVERRIDES, "--nproc", "2", check=False)
    assert failed.returncode != 0
    assert f"not enough space in {small_fs / 'ckpt'} for checkpoint step-00000008" in failed.stderr
    assert "The previous checkpoint step-00000004 is intact" in failed.stderr
    assert [p.name for p in complete_checkpoints(small_fs / "ckpt")] == ["step-00000004"]
    assert not list((small_fs / "ckpt").glob(".tmp-*"))

    # More space, same command: resumes from step 4 and ends exactly where an uninterrupted run ends.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    resumed = run_dtrain("train", str(config), *FULL_OVERRIDES, "--nproc", "2")
    assert f"resumed from {small_fs / 'ckpt' / 'step-00000004'}" in resumed.stdout
    expected, got = read_metrics(full_reference(2)), read_metrics(tmp_path / "run")
    assert sorted(got) == sorted(expected) and all(got[s] == expected[s] for s in got)
