"""LoRA and QLoRA: peft adapters on a frozen base, the base either bf16/fp32 (lora) or 4-bit NF4 (qlora).

Both strategies train only the adapter (plus `lora.modules_to_save`), so checkpoints exclude the frozen base:
DeepSpeed writes the adapter, its optimizer state and the scheduler; dtrain.checkpoint adds RNG (LoRA dropout draws
from it) and the data position. The base comes back from `model.path` on resume and at export.

Checks that need the model's shape (which modules exist) read config.json and build the model on the meta device:
no weights are loaded, so `dtrain check` runs them on a login node for an 8B model in seconds (mostly imports).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtrain.config import Config, LoraConfig
from dtrain.dist import DistEnv
from dtrain.model import DTYPES, BuiltModel, load_pretrained

REPORT_FILE = "trainable_parameters.json"
# DeepSpeed saves only what requires grad. Loading is not strict: the frozen base is absent from the checkpoint, and
# bitsandbytes' quant-state entries (absmax, quant_map, ...), should a checkpoint hold them, make DeepSpeed's strict
# load fail with "Unexpected key(s)". The base is rebuilt from model.path, so nothing is lost.
SAVE_OPTIONS = {"exclude_frozen_parameters": True}
LOAD_OPTIONS = {"load_module_strict": False}
_ADAPTABLE = ("Linear", "Linear4bit", "Embedding", "Conv1D", "Conv1d", "Conv2d")


# ---------------------------------------------------------------------------------------------------------------
# Building the model of a rank


def build_lora(cfg: Config, env: DistEnv, ds_config: dict[str, Any]) -> BuiltModel:
    """The base in the training precision (partitioned at load under ZeRO-3), adapters on top."""
    model, keepalive = load_pretrained(cfg, env, ds_config)
    model = add_adapters(model, cfg)
    report_trainable(model, cfg, env)
    return BuiltModel(model, save_options=dict(SAVE_OPTIONS), load_options=dict(LOAD_OPTIONS), keepalive=keepalive)


def build_qlora(cfg: Config, env: DistEnv, ds_config: dict[str, Any]) -> BuiltModel:
    """The base quantized to 4 bit while loading, prepared for k-bit training, adapters on top.

    transformers does not partition a quantized model at load time, so every rank loads the (small) 4-bit base;
    under ZeRO-3, DeepSpeed partitions it in `deepspeed.initialize`.
    """
    from peft import prepare_model_for_kbit_training

    kwargs: dict[str, Any] = {"quantization_config": bnb_config(cfg)}
    if env.device.type == "cuda" and ds_config["zero_optimization"]["stage"] < 3:
        kwargs["device_map"] = {"": env.device.index}  # bitsandbytes quantizes on the GPU; ZeRO-3 refuses device_map
    model, keepalive = load_pretrained(cfg, env, ds_config, **kwargs)
    disable_cpu_weight_repacking(model, env.device)
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=cfg.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    model = add_adapters(model, cfg)
    keep_only_tensors_in_state_dict(model)
    report_trainable(model, cfg, env)
    return BuiltModel(model, save_options=dict(SAVE_OPTIONS), load_options=dict(LOAD_OPTIONS), keepalive=keepalive)


def keep_only_tensors_in_state_dict(model: torch.nn.Module) -> None:
    """Drop bitsandbytes' quant-state entries (absmax, quant_map, nested_*) from the model's state dict.

    They describe the frozen 4-bit base (~1/64 of its size: ~110 MB for an 8B model), which DeepSpeed's
    `exclude_frozen_parameters` does not recognise as frozen because they are not parameters. The base is
    re-quantized from model.path on resume (quantization is deterministic), so checkpoints need only the adapter.
    """
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}

    def drop_extras(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in names]:
            del state_dict[key]

    model.register_state_dict_post_hook(drop_extras)


def bnb_config(cfg: Config) -> Any:
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
    )


def peft_config(lora: LoraConfig, base_model_path: str | None = None) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path,
    )


def add_adapters(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Wrap in a PeftModel. The adapter init is seeded on its own, so it is the same on every rank and whatever
    the loading path (ZeRO-3 or not) drew from the global RNG before."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        peft_model = get_peft_model(model, peft_config(cfg.lora, cfg.model.path))
    if cfg.model.gradient_checkpointing:
        peft_model.config.use_cache = False
    return peft_model


def disable_cpu_weight_repacking(model: torch.nn.Module, device: torch.device) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in place on CPUs with AVX512-BF16; returns layers changed.

    On such CPUs a `Linear4bit` in eval/no-grad mode rewrites its weight into a CPU-only packed layout. After that,
    training silently loses input gradients (an eval pass corrupts every later step), ZeRO-3's partitioned 4-bit
    weights are overwritten, and layers with out-features not a multiple of 32 assert. The flag only exists for the
    CPU kernel, so it is left alone on GPUs.
    """
    if device.type != "cpu":
        return 0
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


# ---------------------------------------------------------------------------------------------------------------
# Trainable-parameter report


@dataclass
class ParameterReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def line(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.4f} %)"

    def to_dict(self) -> dict[str, float]:
        return {"trainable": self.trainable, "total": self.total, "percent": self.percent}


def parameter_numel(param: torch.Tensor) -> int:
    """Elements of the parameter as the model sees it: whole under ZeRO-3 partitioning, unpacked for 4-bit."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit: two 4-bit values per stored byte
        return math.prod(quant_state.shape)
    return getattr(param, "ds_numel", None) or param.numel()


def count_parameters(model: torch.nn.Module) -> ParameterReport:
    trainable = total = 0
    for param in model.parameters():
        n = parameter_numel(param)
        total += n
        trainable += n if param.requires_grad else 0
    return ParameterReport(trainable, total)


def report_trainable(model: torch.nn.Module, cfg: Config, env: DistEnv) -> ParameterReport:
    """Print the count on rank 0 and keep it in <output_dir>/trainable_parameters.json."""
    report = count_parameters(model)
    if env.is_main:
        targets = cfg.lora.target_modules
        where = targets if isinstance(targets, str) else ",".join(targets)
        print(f"{cfg.strategy} r={cfg.lora.r} alpha={cfg.lora.alpha} on {where}: {report.line()}", flush=True)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def planned_report(cfg: Config) -> ParameterReport:
    """The count a run of `cfg` will print, from config.json alone (the model is built on the meta device)."""
    return count_parameters(meta_peft_model(cfg))


# ---------------------------------------------------------------------------------------------------------------
# The model's shape without its weights


def meta_model(model_path: str | Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def meta_peft_model(cfg: Config) -> torch.nn.Module:
    """Base + adapters on the meta device: the names and shapes of every adapter tensor, no memory."""
    from peft import get_peft_model

    return get_peft_model(meta_model(cfg.model.path), peft_config(cfg.lora, cfg.model.path))


def expected_adapter_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Trained tensor name (as in the engine's module) -> shape, for the adapter of `cfg`."""
    model = meta_peft_model(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------------
# Problems a config can have that only the model (or the launch layout) reveals: reported by `dtrain check`.


def adapter_problems(cfg: Config) -> list[str]:
    """Target modules and modules_to_save that this model does not have, each naming its key; [] for full."""
    if cfg.strategy == "full" or not (Path(cfg.model.path) / "config.json").is_file():
        return []  # a missing model directory is reported by the config validation
    try:
        model = meta_model(cfg.model.path)
    except (ValueError, KeyError, OSError) as e:
        return [f"model.path: cannot build the model from {cfg.model.path}/config.json: {e}"]
    modules = dict(model.named_modules())
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if _is_adaptable(m)})
    problems = []
    if isinstance(cfg.lora.target_modules, list):
        for i, target in enumerate(cfg.lora.target_modules):
            found = [m for name, m in modules.items() if _matches(name, target)]
            if not found:
                problems.append(
                    f"lora.target_modules[{i}]: {target!r} is no module of this {type(model).__name__} "
                    f"(its layers LoRA can adapt: {', '.join(adaptable)}; or use 'all-linear')"
                )
            elif not any(_is_adaptable(m) for m in found):
                kind = type(found[0]).__name__
                problems.append(f"lora.target_modules[{i}]: {target!r} is a {kind}, which LoRA cannot adapt")
    for i, name in enumerate(cfg.lora.modules_to_save):
        if not any(_matches(module, name) for module in modules):
            problems.append(f"lora.modules_to_save[{i}]: {name!r} is no module of this {type(model).__name__}")
    return problems


def qlora_layout_problems(cfg: Config, nnodes: int) -> list[str]:
    """qlora is single-node: the 4-bit base is loaded whole on every rank and bitsandbytes' quantized weights are
    not sharded across nodes."""
    if cfg.strategy == "qlora" and nnodes > 1:
        return [
            f"strategy: qlora runs on a single node, but the launch asks for {nnodes} nodes (use nnodes 1, or lora)"
        ]
    return []


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def _is_adaptable(module: torch.nn.Module) -> bool:
    # On the meta device a qlora base is still nn.Linear: bitsandbytes swaps those for Linear4bit at load.
    return type(module).__name__ in _ADAPTABLE
