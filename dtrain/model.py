"""Building the model for a strategy: what differs between full, lora and qlora lives here and nowhere else.

Each strategy is a pure function of the validated config (plus the machine's device), returning a model ready for
`deepspeed.initialize` and the checkpoint options that fit what it trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dtrain.config import Config
from dtrain.dist import DistEnv

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BuiltModel:
    module: torch.nn.Module
    save_options: dict[str, Any] = field(default_factory=dict)
    """Extra kwargs for engine.save_checkpoint (e.g. exclude_frozen_parameters for adapters)."""
    load_options: dict[str, Any] = field(default_factory=dict)
    """Extra kwargs for engine.load_checkpoint."""
    keepalive: Any = None
    """transformers finds the ZeRO-3 config through a weak global reference: it must outlive the model."""


class Strategy(Protocol):
    def __call__(self, cfg: Config, env: DistEnv, ds_config: dict[str, Any]) -> BuiltModel: ...


def load_pretrained(cfg: Config, env: DistEnv, ds_config: dict[str, Any], **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """Load the HF model; under ZeRO-3 its parameters are partitioned while loading, never whole on one rank."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keepalive = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.path,
        dtype=DTYPES[cfg.train.precision],
        attn_implementation=cfg.model.attn_implementation,
        **kwargs,
    )
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()  # from_pretrained leaves the model in eval mode (dropout off)
    return model, keepalive


def build_full(cfg: Config, env: DistEnv, ds_config: dict[str, Any]) -> BuiltModel:
    model, keepalive = load_pretrained(cfg, env, ds_config)
    return BuiltModel(model, keepalive=keepalive)


def strategy_for(cfg: Config) -> Strategy:
    if cfg.strategy == "full":
        return build_full
    from dtrain import adapters  # peft and bitsandbytes are imported only by runs that use them

    return adapters.build_lora if cfg.strategy == "lora" else adapters.build_qlora
