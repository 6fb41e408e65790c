"""Shared by the end-to-end tests: write a run config for the tiny model, run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, tiny_model: Path, base: str = "configs/tiny-full-zero3.yaml", **sections) -> Path:
    """The shipped tiny config pointed at `tiny_model`, with `sections` merged in (dotted keys allowed)."""
    raw = yaml.safe_load((REPO / base).read_text())
    raw["model"]["path"] = str(tiny_model)
    for ds in raw["data"]["datasets"]:
        ds["path"] = str(REPO / ds["path"])
    raw["output_dir"] = str(path.parent / "run")
    raw["logging"]["progress_bar"] = False
    for dotted, value in sections.items():
        *parents, last = dotted.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def dtrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dtrain_launch.cli", *args]


def run_dtrain(
    *args: str, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`dtrain ARGS` in a subprocess; `env` adds to (or overrides) this process's environment."""
    proc = subprocess.run(
        dtrain_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"dtrain {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


FULL_STEPS = 12
FULL_OVERRIDES = [
    f"train.max_steps={FULL_STEPS}", "checkpoint.every_steps=4", "checkpoint.keep_last=0", "eval.every_steps=6",
    # the same global batch (8) on any number of ranks, so runs on 1 and 2 ranks read the same samples per step
    "train.gradient_accumulation_steps=null", "train.global_batch_size=8",
]  # fmt: skip


def consolidated(checkpoint: Path) -> dict:
    """fp32 weights of a full-strategy checkpoint, gathered from its ZeRO shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")
