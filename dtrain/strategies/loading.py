"""Loading a Hugging Face causal LM for training, and its shape without weights; shared by every strategy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dtrain.tables import torch_dtype

if TYPE_CHECKING:
    from dtrain.config import Config


def load_pretrained(cfg: Config, ds_config: dict[str, Any], **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """Load the HF model; under ZeRO-3 its parameters are partitioned while loading, never whole on one rank.
    Returns (model, keepalive): the keepalive must outlive the model (see BuiltModel)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keepalive = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.path,
        dtype=torch_dtype(cfg.train.precision),
        attn_implementation=cfg.model.attn_implementation,
        **kwargs,
    )
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()  # from_pretrained leaves the model in eval mode (dropout off)
    return model, keepalive


def meta_model(model_path: str | Path) -> torch.nn.Module:
    """The model built from config.json on the meta device: every module and shape, no memory, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
