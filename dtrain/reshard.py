"""Resuming on a different number of ranks: ZeRO shards -> DeepSpeed's universal checkpoint, once, atomically.

ZeRO partitions optimizer state (and, at stage 3, parameters) by rank, so shards written by N ranks cannot be
loaded by M. DeepSpeed's `ds_to_universal` rewrites them per parameter; the engine then re-partitions on load.
The converted copy is cached as `<checkpoint>/universal/`, built in a temporary folder beside it and renamed when
complete, so a crash during conversion leaves the checkpoint as it was and the next launch converts again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from dtrain.build_once import build_once
from dtrain.checkpoint_layout import ENGINE_TAG, UNIVERSAL_TAG


def ensure_universal(checkpoint: Path, rank: int, grace_s: float) -> None:
    """Rank 0 converts (if not cached); the other ranks wait for the folder through dtrain.build_once: a long
    conversion cannot trip a collective timeout, and a failed one stops them at once."""
    final = checkpoint / UNIVERSAL_TAG
    build_once(final, lambda staging: convert(checkpoint, staging), is_builder=rank == 0, grace_s=grace_s)


def unshare_step_counters(optimizer: Any) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group the same `step` tensor object; torch's
    AdamW increments it in place once per group, so with two groups (decayed / not decayed) the bias correction runs
    ahead and the loss drifts from the uninterrupted run. Each group gets its own counter back."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def convert(checkpoint: Path, staging: Path) -> None:
    """ds_to_universal of `<checkpoint>/ds` into `staging` (renamed to `<checkpoint>/universal` by build_once)."""
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
    # ds_to_universal writes its tensors under the output folder and a `latest_universal` pointer beside it: the
    # pointer is dropped, the tensors become the staging folder's content.
    for item in (staging / UNIVERSAL_TAG).iterdir():
        item.rename(staging / item.name)
    (staging / UNIVERSAL_TAG).rmdir()
    (staging / "latest_universal").unlink(missing_ok=True)
