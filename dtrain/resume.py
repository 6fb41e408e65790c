"""Where a run starts: the one decision, made the same way by the launcher's checks and by every rank.

`checkpoint.resume` picks the checkpoint (auto: the newest complete one; never: none, refusing a folder that has
some; or a path). A run resumed on another number of ranks keeps the checkpoint's global batch by changing the
accumulation steps, and, where ZeRO partitioned the optimizer by rank, loads through DeepSpeed's universal format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dtrain.checkpoint_layout import STATE_FILE, UNIVERSAL_TAG, Progress, complete_checkpoints, read_progress
from dtrain.config import Config, ConfigError
from dtrain.layout import BatchLayout


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: Path | None
    progress: Progress | None
    layout: BatchLayout
    universal: bool
    """Saved on another world size with ZeRO-partitioned state: load `<checkpoint>/universal/`."""

    def describe(self) -> str:
        if self.checkpoint is None:
            return "start from scratch"
        saved = self.progress
        text = f"resume from {self.checkpoint} (step {saved.step}, sample {saved.samples_seen})"
        if saved.world_size == self.layout.world_size:
            return text
        text += (
            f"; saved on {saved.world_size} ranks, resumed on {self.layout.world_size}: global batch "
            f"{self.layout.global_batch_size} kept with {self.layout.gradient_accumulation_steps} accumulation steps"
        )
        if self.universal:
            cached = (self.checkpoint / UNIVERSAL_TAG).is_dir()
            text += "; universal checkpoint " + ("cached" if cached else "converted once at start")
        return text


def plan_resume(cfg: Config, world_size: int) -> ResumePlan:
    """The start of a run of `cfg` on `world_size` ranks; ConfigError if `checkpoint.resume` cannot be honoured or
    the saved global batch does not fit the new world size."""
    checkpoint = find_resume_checkpoint(cfg)
    progress = read_progress(checkpoint) if checkpoint else None
    layout = BatchLayout.from_config(cfg.train, world_size, progress.global_batch_size if progress else None)
    # Stage 0 keeps whole optimizer state in one file, loadable anywhere; ZeRO stages partition it by rank.
    universal = progress is not None and cfg.deepspeed.stage >= 1 and progress.world_size != world_size
    return ResumePlan(checkpoint, progress, layout, universal)


def find_resume_checkpoint(cfg: Config) -> Path | None:
    directory, mode = cfg.checkpoint_dir, cfg.checkpoint.resume
    if mode == "auto":
        found = complete_checkpoints(directory)
        return found[-1] if found else None
    if mode == "never":
        if complete_checkpoints(directory):
            raise ConfigError(
                [
                    f"checkpoint.resume: 'never' but {directory} already holds checkpoints; "
                    "use a new output_dir or resume: auto"
                ]
            )
        return None
    path = Path(mode)
    if not (path / STATE_FILE).is_file():
        raise ConfigError([f"checkpoint.resume: {path} is not a complete checkpoint (no {STATE_FILE})"])
    return path
