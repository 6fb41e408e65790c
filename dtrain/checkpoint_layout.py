"""Where checkpoints live and what makes one complete; read by the trainer, the launcher's checks, export and status
without importing torch.

Layout of one checkpoint (`<dir>/step-00000040/`):
    ds/                     DeepSpeed shards: every rank writes its own model/optimizer partition
    ds/offloaded_tensors/   with optimizer states on NVMe: each rank's fp32 master weights and moments as swap files
                            (the ZeRO files then hold empty placeholders for them)
    rng/rank-00000.pt ...   RNG states of every rank (dropout draws from them)
    config.yaml             the resolved config of the run
    trainer_state.json      step, data position, tokens seen, batch layout; written LAST
    universal/              DeepSpeed's universal checkpoint, converted from ds/ when resuming on another world size

A folder named `step-*` that holds trainer_state.json is complete; `.tmp-*` and `.deleting-*` folders never are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

STATE_FILE = "trainer_state.json"
ENGINE_TAG = "ds"
UNIVERSAL_TAG = "universal"
_NAME = re.compile(r"^step-(\d{8})$")
SWAPPED_STATES = "offloaded_tensors"


@dataclass
class Progress:
    """Where a run stands; the data position is a global sample count, valid on any number of ranks."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    global_batch_size: int = 0
    world_size: int = 0
    retention_baseline: dict[str, float] = field(default_factory=dict)
    """eval.retention's losses at step 0 (the base model), by name: kept so a resumed run does not re-measure them
    on weights that are no longer the base's (dtrain.retention)."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(checkpoint: Path) -> bool:
    return bool(_NAME.match(checkpoint.name)) and (checkpoint / STATE_FILE).is_file()


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if is_complete(p)), key=lambda p: p.name)


def read_progress(checkpoint: Path) -> Progress:
    state = json.loads((checkpoint / STATE_FILE).read_text())
    return Progress(**state["progress"])


def swapped_optimizer_states(checkpoint: Path) -> str:
    """Why a checkpoint of a run with optimizer states on NVMe cannot be consolidated ("" for any other): its fp32
    master weights and moments are DeepSpeed swap files that `load_checkpoint` copies back, but neither
    `zero_to_fp32` (export) nor `ds_to_universal` (a resume on another number of ranks) reads them."""
    if not (checkpoint / ENGINE_TAG / SWAPPED_STATES).is_dir():
        return ""
    return (
        f"{checkpoint} keeps its fp32 weights and optimizer states in DeepSpeed's NVMe swap files "
        f"({ENGINE_TAG}/{SWAPPED_STATES}/, deepspeed.offload_optimizer.device: nvme), which export and the universal "
        "conversion cannot read; resume it on the number of ranks it was saved on"
    )
