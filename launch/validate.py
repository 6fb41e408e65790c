"""Checks every launcher runs before starting anything: `dtrain check`, `dtrain train` and `dtrain submit` agree."""

from __future__ import annotations

from pathlib import Path

from dtrain.config import Config, ConfigError, load_config
from dtrain.layout import BatchLayout


def load_for_launch(config: str, overrides: list[str], nnodes: int) -> Config:
    """The config, validated, plus what needs the model's shape or the launch (LoRA targets, qlora on one node)."""
    cfg = load_config(config, overrides)
    if cfg.strategy != "full":
        from dtrain.adapters import adapter_problems, qlora_layout_problems

        problems = qlora_layout_problems(cfg, nnodes) + adapter_problems(cfg)
        if problems:
            raise ConfigError(problems, config)
    return cfg


def resume_plan(cfg: Config, layout: BatchLayout) -> str:
    """Where a run on `layout` starts; on another world size, how the global batch is kept (ConfigError if not)."""
    from dtrain.checkpoint import read_progress, resolve_resume
    from dtrain.reshard import UNIVERSAL_TAG, needs_universal

    try:
        checkpoint = resolve_resume(cfg)
    except (FileExistsError, FileNotFoundError) as e:
        raise ConfigError([f"checkpoint.resume: {e}"]) from e
    if checkpoint is None:
        return "start from scratch"
    saved = read_progress(checkpoint)
    text = f"resume from {checkpoint} (step {saved.step}, sample {saved.samples_seen})"
    if saved.world_size == layout.world_size:
        return text
    kept = BatchLayout.from_config(cfg.train, layout.world_size, saved.global_batch_size)
    text += (
        f"; saved on {saved.world_size} ranks, resumed on {kept.world_size}: global batch {kept.global_batch_size} "
        f"kept with {kept.gradient_accumulation_steps} accumulation steps"
    )
    if needs_universal(saved, layout.world_size, cfg.deepspeed.stage):
        cached = (Path(checkpoint) / UNIVERSAL_TAG).is_dir()
        text += "; universal checkpoint " + ("cached" if cached else "converted once at start")
    return text


def fit_report(cfg: Config, layout: BatchLayout, hardware) -> list[str]:
    """["fits"] or ["does NOT fit", problem, ...]; [] when the hardware is not known."""
    if hardware is None:
        return []
    from dtrain.plan import fit_problems

    problems = fit_problems(cfg, layout, hardware)
    return ["fits"] if not problems else ["does NOT fit", *problems]
