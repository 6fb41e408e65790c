"""Is this run launchable? The one answer that `dtrain check`, `dtrain train`, `dtrain submit` and every rank's
entry point get, so that nothing that `check` would refuse ever starts a process or a job.

Everything here reads files only (the config, the model's config.json, the checkpoint folder): no weights are
loaded and no process group exists.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from dtrain import strategies
from dtrain.config import Config, ConfigError, load_config
from dtrain.resume import ResumePlan, plan_resume


@dataclass(frozen=True)
class Launch:
    """Where and how the run will go: nodes x ranks per node."""

    nnodes: int
    nproc_per_node: int
    local: bool = True
    """Started on this machine (dtrain train, a rank): what it lacks, the run lacks. False for submit, where the
    compute nodes may have what the login node does not (a GPU)."""

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


@dataclass(frozen=True)
class Preflight:
    cfg: Config
    launch: Launch
    resume: ResumePlan


def preflight(config: str, overrides: list[str], launch: Launch) -> Preflight:
    """Every check, all problems in one ConfigError."""
    problems = launch_problems(launch)
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        raise ConfigError(problems + e.problems, config) from e
    strategy = strategies.get(cfg.strategy)
    problems += strategy.layout_problems(cfg, launch.nnodes)
    problems += strategy.model_problems(cfg)
    problems += attention_problems(cfg, launch)
    if problems:
        raise ConfigError(problems, config)
    try:
        resume = plan_resume(cfg, launch.world_size)
    except ConfigError as e:
        raise ConfigError(e.problems, config) from e
    return Preflight(cfg, launch, resume)


def launch_problems(launch: Launch) -> list[str]:
    problems = []
    if launch.nnodes < 1:
        problems.append(f"--nodes: must be >= 1, got {launch.nnodes}")
    if launch.nproc_per_node < 1:
        problems.append(f"--nproc: ranks per node must be >= 1, got {launch.nproc_per_node}")
    return problems


def attention_problems(cfg: Config, launch: Launch) -> list[str]:
    """flash_attention_2 needs the flash-attn package (and, where the run starts here, a CUDA GPU): without them
    transformers fails inside every rank, after the job has started."""
    if cfg.model.attn_implementation != "flash_attention_2":
        return []
    if importlib.util.find_spec("flash_attn") is None:
        return ["model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn)"]
    if launch.local:
        import torch

        if not torch.cuda.is_available():
            return ["model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa on this machine"]
    return []
