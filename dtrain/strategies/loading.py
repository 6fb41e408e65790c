"""Loading a Hugging Face causal LM for training, and its shape without weights; shared by every strategy."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dtrain.attention import attention_for
from dtrain.families import mark_zero3_leaves, router_loss_overrides
from dtrain.tables import torch_dtype

if TYPE_CHECKING:
    from dtrain.config import Config


def load_pretrained(cfg: Config, ds_config: dict[str, Any], **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """Load the HF model; under ZeRO-3 its parameters are partitioned while loading, never whole on one rank.
    Returns (model, keepalive): the keepalive must outlive the model (see BuiltModel)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config["zero_optimization"]["stage"] == 3
    keepalive = HfDeepSpeedConfig(ds_config) if zero3 else None
    config = json.loads((cfg.model.local_dir() / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.local_dir(),
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=torch_dtype(cfg.train.precision),
        attn_implementation=attention_for(cfg).implementation,
        **router_loss_overrides(config, cfg.model.router_aux_loss_coef),
        **kwargs,
    )
    if zero3:
        mark_zero3_leaves(model)  # separate expert modules only (dtrain.families): fused experts need none
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()  # from_pretrained leaves the model in eval mode (dropout off)
    return model, keepalive


def load_for_eval(cfg: Config, device: torch.device, **kwargs: Any) -> torch.nn.Module:
    """The base as training loads it (same dtype and attention), whole in one process, on `device`, in eval mode.
    `kwargs` go to from_pretrained (quantization; a device_map places the model itself)."""
    model, _ = load_pretrained(cfg, {"zero_optimization": {"stage": 0}}, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    return model.eval()


def load_trained(model: torch.nn.Module, tensors: Mapping[str, Any], checkpoint: Path) -> None:
    """Copy a checkpoint's trained tensors (named as in the training engine's module, which is `model`'s layout)
    into `model`, one at a time: lazy ZeRO-3 tensors materialize here. Every trainable parameter must be there."""
    from dtrain.export import ExportError

    params = dict(model.named_parameters())
    missing = [name for name, param in params.items() if param.requires_grad and name not in tensors]
    if missing:
        raise ExportError(f"{checkpoint}: no trained values for {len(missing)} parameter(s), e.g. {missing[0]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name in params:
                params[name].copy_(tensor.contiguous())


def meta_model(model_path: str | Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model built from config.json on the meta device: every module and shape, no memory, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
