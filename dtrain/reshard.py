"""Resuming on a different number of ranks: ZeRO shards -> DeepSpeed's universal checkpoint, once, atomically.

ZeRO partitions optimizer state (and, at stage 3, parameters) by rank, so shards written by N ranks cannot be
loaded by M. DeepSpeed's `ds_to_universal` rewrites them per parameter; the engine then re-partitions on load.
The converted copy is cached as `<checkpoint>/universal/`, built in `<checkpoint>/.tmp-universal/` and renamed when
complete, so a crash during conversion leaves the checkpoint as it was and the next launch converts again.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dtrain.checkpoint import ENGINE_TAG, Progress

UNIVERSAL_TAG = "universal"


def needs_universal(saved: Progress, world_size: int, zero_stage: int) -> bool:
    """Stage 0 keeps whole optimizer state in one file, loadable anywhere; ZeRO stages partition it by rank."""
    return zero_stage >= 1 and saved.world_size != world_size


def ensure_universal(checkpoint: Path, rank: int, timeout_s: float) -> None:
    """Rank 0 converts (if not cached); the other ranks wait for the folder to appear. The wait polls the file
    system rather than running a collective, so a long conversion cannot trip a collective timeout."""
    final = checkpoint / UNIVERSAL_TAG
    if rank == 0 and not final.is_dir():
        convert(checkpoint)
    deadline = time.monotonic() + timeout_s
    while not final.is_dir():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: {final} did not appear within {timeout_s:.0f}s (conversion on rank 0)")
        time.sleep(1.0)


def unshare_step_counters(optimizer: Any) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group the same `step` tensor object; torch's
    AdamW increments it in place once per group, so with two groups (decayed / not decayed) the bias correction runs
    ahead and the loss drifts from the uninterrupted run. Each group gets its own counter back."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def convert(checkpoint: Path) -> None:
    staging = checkpoint / ".tmp-universal"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(checkpoint / ENGINE_TAG),
            "--output_folder",
            str(staging / UNIVERSAL_TAG),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ],  # fmt: skip
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"converting {checkpoint} to a universal checkpoint failed:\n{proc.stderr[-4000:]}")
    # ds_to_universal writes a `latest_universal` pointer beside its output folder: it stays behind in staging.
    (staging / UNIVERSAL_TAG).rename(checkpoint / UNIVERSAL_TAG)
    shutil.rmtree(staging, ignore_errors=True)
