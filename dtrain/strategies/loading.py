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


def load_pretrained(
    cfg: Config, ds_config: dict[str, Any], device: torch.device, **kwargs: Any
) -> tuple[torch.nn.Module, Any]:
    """Load the HF model; under ZeRO-3 its parameters are partitioned while loading, never whole on one rank;
    below it, straight onto the rank's `device`. Returns (model, keepalive): the keepalive must outlive the model
    (see BuiltModel). `kwargs` go to from_pretrained (quantization)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    stage = ds_config["zero_optimization"]["stage"]
    keepalive = HfDeepSpeedConfig(ds_config) if stage == 3 else None
    config = json.loads((cfg.model.local_dir() / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.local_dir(),
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=torch_dtype(cfg.train.precision),
        attn_implementation=attention_for(cfg).implementation,
        device_map=load_device_map(stage, device),
        **router_loss_overrides(config, cfg.model.router_aux_loss_coef),
        **kwargs,
    )
    if stage == 3:
        mark_zero3_leaves(model)  # separate expert modules only (dtrain.families): fused experts need none
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()  # from_pretrained leaves the model in eval mode (dropout off)
    return model, keepalive


def load_device_map(stage: int, device: torch.device) -> dict[str, int] | None:
    """Where from_pretrained puts the weights. On a GPU below ZeRO-3, on the rank's GPU as they are read: loaded on
    the host first, a node's 8 ranks would each hold the whole model in host RAM (128 GB for an 8B model) until
    DeepSpeed moves it, and bitsandbytes quantizes on the GPU it loads to. ZeRO-3's partitioned load refuses a
    device_map; on CPU the host is the device."""
    return {"": device.index or 0} if device.type == "cuda" and stage < 3 else None


def load_for_eval(cfg: Config, device: torch.device, **kwargs: Any) -> torch.nn.Module:
    """The base as training loads it (same dtype and attention), whole in one process, on `device`, in eval mode.
    `kwargs` go to from_pretrained (quantization)."""
    model, _ = load_pretrained(cfg, {"zero_optimization": {"stage": 0}}, device, **kwargs)
    if load_device_map(0, device) is None:  # else loaded there (and a quantized model refuses .to)
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
