"""Where a run starts: the one decision, made the same way by the launcher's checks and by every rank.

`checkpoint.resume` picks the checkpoint (auto: the newest complete one; never: none, refusing a folder that has
some; or a path). A run resumed on another number of ranks keeps the checkpoint's global batch by changing the
accumulation steps, and, where ZeRO partitioned the optimizer by rank, loads through DeepSpeed's universal format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dtrain import strategies
from dtrain.checkpoint_layout import (
    STATE_FILE,
    UNIVERSAL_TAG,
    Progress,
    complete_checkpoints,
    read_progress,
    swapped_optimizer_states,
)
from dtrain.config import Config, ConfigError, read_yaml
from dtrain.config.typed import convert
from dtrain.fingerprint import run_fingerprints
from dtrain.layout import BatchLayout
from dtrain.resume_changes import Changes, compare


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: Path | None
    progress: Progress | None
    layout: BatchLayout
    universal: bool
    """Saved on another world size with ZeRO-partitioned state: load `<checkpoint>/universal/`."""
    changes: list[str] = field(default_factory=list)
    """Config differences from the checkpoint that the resume accepts (printed by check and the trainer)."""

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
    """The start of a run of `cfg` on `world_size` ranks; ConfigError if `checkpoint.resume` cannot be honoured, the
    run differs from the checkpoint's in what it trains, or the saved global batch does not fit the world size."""
    checkpoint = find_resume_checkpoint(cfg)
    progress = read_progress(checkpoint) if checkpoint else None
    changes = same_run_changes(cfg, checkpoint) if checkpoint else Changes()
    if changes.refused:
        raise ConfigError([*changes.refused, _refusal_hint(cfg, checkpoint, changes)])
    layout = BatchLayout.from_config(cfg.train, world_size, progress.global_batch_size if progress else None)
    # Stage 0 keeps whole optimizer state in one file, loadable anywhere; ZeRO stages partition it by rank.
    universal = progress is not None and cfg.deepspeed.stage >= 1 and progress.world_size != world_size
    if universal and swapped_optimizer_states(checkpoint):
        raise ConfigError(
            [
                f"checkpoint.resume: saved on {progress.world_size} ranks, resumed on {world_size}: "
                f"{swapped_optimizer_states(checkpoint)}"
            ]
        )
    return ResumePlan(checkpoint, progress, layout, universal, changes.allowed)


def same_run_changes(cfg: Config, checkpoint: Path) -> Changes:
    """How this run's config and files differ from those the checkpoint was trained with."""
    saved = with_defaults(read_yaml(checkpoint / "config.yaml") or {})
    saved_prints = json.loads((checkpoint / STATE_FILE).read_text()).get("fingerprints", {})
    sections = strategies.get(cfg.strategy).sections
    return compare(saved, saved_prints, cfg.to_dict(), run_fingerprints(cfg), sections)


def with_defaults(saved: dict) -> dict:
    """A saved config with every key it lacks at its default: a checkpoint written before dtrain had a key (e.g.
    train.optimizer_states) trained with the behaviour that key's default keeps, so it is no change."""
    return convert(Config, saved, "", []).to_dict()


def _refusal_hint(cfg: Config, checkpoint: Path, changes: Changes) -> str:
    hint = (
        f"checkpoint.resume: {checkpoint} was trained with a different run (above). Start a fresh run with a new "
        "output_dir"
    )
    allowable = [line.split(":")[0] for line in changes.refused if line.split(":")[0] not in changes.unloadable]
    if allowable:
        hint += f", or resume deliberately with checkpoint.allow_changes=[{', '.join(allowable)}]"
    if changes.unloadable:
        hint += (
            f"; {', '.join(changes.unloadable)} cannot be allowed: the saved tensors cannot be loaded into this model"
        )
    return hint


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
