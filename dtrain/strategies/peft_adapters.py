"""LoRA adapters with peft, shared by the lora and qlora strategies: adding them, checking their targets against
the model, counting what they train, and exporting them (PEFT adapter folder, or merged into the base).

Both strategies train only the adapter (plus `lora.modules_to_save`), so checkpoints exclude the frozen base:
DeepSpeed writes the adapter, its optimizer state and the scheduler; dtrain.checkpoint adds RNG (LoRA dropout
draws from it) and the data position. The base comes back from `model.path` on resume and at export.

Counts that need the model's shape read config.json and build the model on the meta device: no weights are loaded,
so `dtrain check` runs them on a login node for an 8B model in seconds (mostly imports). Which modules LoRA can
target: dtrain.strategies.targets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dtrain.config.model import mutates_base
from dtrain.export import (
    ExportError,
    ExportResult,
    copy_model_files,
    copy_tokenizer,
    export_dtype,
    lazy_engine_tensors,
    peak_rss_mb,
    write_sharded,
)
from dtrain.strategies.loading import meta_model
from dtrain.strategies.protocol import ExportOptions
from dtrain.tables import torch_dtype

if TYPE_CHECKING:
    from dtrain.config import Config, LoraConfig
    from dtrain.dist import DistEnv

REPORT_FILE = "trainable_parameters.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# pissa / olora: the adapter as initialized (A0, B0), beside the checkpoints it belongs to (see keep_initial_adapter).
INITIAL_ADAPTER = "initial_adapter.safetensors"


def peft_config(lora: LoraConfig, base_model_path: str | None = None, model: torch.nn.Module | None = None) -> Any:
    """peft's LoraConfig for `lora`; with `model`, its targets resolved against the model's modules and expert
    parameters (dtrain.strategies.targets: what a mixture-of-experts model adapts)."""
    from peft import LoraConfig as PeftLoraConfig

    from dtrain.strategies.targets import resolve_for_model, split_targets

    target_modules, target_parameters = lora.target_modules, []
    if model is not None:
        target_modules, target_parameters = split_targets(model, lora.target_modules)
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        target_parameters=target_parameters or None,
        bias=lora.bias,
        modules_to_save=list(lora.modules_to_save) or None,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=lora.init_lora_weights,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path,
    )
    if model is not None:
        resolve_for_model(config, model, lora.target_modules)
    return config


def add_adapters(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Wrap in a PeftModel. The adapter init is seeded on its own, so it is the same on every rank and whatever
    the loading path (ZeRO-3 or not) drew from the global RNG before."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        peft_model = get_peft_model(model, peft_config(cfg.lora, cfg.model.path, model))
    if cfg.model.gradient_checkpointing:
        peft_model.config.use_cache = False
    return peft_model


def keep_initial_adapter(model: torch.nn.Module, cfg: Config, env: DistEnv) -> None:
    """pissa / olora train on W_res = W - s B0 A0, not on model.path's W. Rank 0 keeps A0, B0 in
    <checkpoint_dir>/initial_adapter.safetensors, so an export can hand a user a plain LoRA of their original base
    (peft's path_initial_model_for_weight_conversion). Training, resume and dtrain eval rebuild W_res from model.path
    with the same seeded init and need no file. Written on every start: the init is deterministic."""
    from safetensors.torch import save_file

    if not mutates_base(cfg.lora.init_lora_weights) or not env.is_main:
        return
    initial = {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if _is_lora_matrix(n)}
    folder = cfg.checkpoint_dir
    folder.mkdir(parents=True, exist_ok=True)
    save_file(initial, str(folder / f".{INITIAL_ADAPTER}.tmp"))
    os.replace(folder / f".{INITIAL_ADAPTER}.tmp", folder / INITIAL_ADAPTER)


def _is_lora_matrix(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def as_lora_of_original_base(tensors: dict[str, torch.Tensor], cfg: Config, checkpoint: Path) -> dict:
    """pissa / olora adapter (A, B) trained on W_res -> the rank-2r LoRA [A; A0], [B, -B0] of the original W:
    W + s (B A - B0 A0) = W_res + s B A (peft's subtract_mutated_init). Other trained tensors pass unchanged."""
    from safetensors.torch import load_file

    path = checkpoint.parent / INITIAL_ADAPTER
    if not path.is_file():
        raise ExportError(
            f"{path}: missing; lora.init_lora_weights {cfg.lora.init_lora_weights} changed the base at step 0 and "
            "this file (written beside the checkpoints at the start of training) holds that change"
        )
    initial = load_file(str(path))
    converted = dict(tensors)
    for name, tensor in tensors.items():
        if ".lora_A." in name:
            converted[name] = torch.cat([tensor, initial[name].to(tensor.dtype)], dim=0)
        elif ".lora_B." in name:
            converted[name] = torch.cat([tensor, -initial[name].to(tensor.dtype)], dim=1)
    return converted


def exported_peft_config(cfg: Config) -> Any:
    """The adapter_config.json of an export (targets resolved against the model, so a mixture of experts' expert
    tensors are named): pissa / olora exports are rank 2r, alpha scaled to keep lora.scale."""
    base = meta_model(cfg.model.local_dir(), cfg.model.trust_remote_code)
    config = peft_config(cfg.lora, cfg.model.path, base)
    if mutates_base(cfg.lora.init_lora_weights):
        config.init_lora_weights = True  # loading must not run the SVD/QR on the user's base again
        config.r *= 2
        config.lora_alpha *= 2**0.5 if cfg.lora.use_rslora else 2
    return config


def exported_tensors(cfg: Config, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The adapter an export writes or merges: of model.path's own weights, whatever the init."""
    tensors = adapter_tensors(cfg, checkpoint)
    if mutates_base(cfg.lora.init_lora_weights):
        return as_lora_of_original_base(tensors, cfg, checkpoint)
    return tensors


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
        print(f"{cfg.strategy} r={cfg.lora.r} alpha={cfg.lora.alpha}{variant_words(cfg.lora)} on {where}: "
              f"{report.line()}", flush=True)  # fmt: skip
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def variant_words(lora: LoraConfig) -> str:
    """What differs from plain LoRA, as printed after alpha (" rslora dora init=pissa loraplus=16"), or ""."""
    words = [word for word, on in (("rslora", lora.use_rslora), ("dora", lora.use_dora)) if on]
    if lora.init_lora_weights is not True:
        words.append(f"init={str(lora.init_lora_weights).lower()}")
    if lora.loraplus_lr_ratio is not None:
        words.append(f"loraplus={lora.loraplus_lr_ratio:g}")
    return "".join(f" {word}" for word in words)


def adapted_lines(cfg: Config) -> list[str]:
    """What the adapter of `cfg` adapts in this model, for `dtrain check`: its modules, its parameters (a mixture of
    experts' fused expert tensors) and the trainable count, from the model built on the meta device."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    model = meta_peft_model(cfg)
    modules: dict[str, int] = {}
    parameters: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            key = f"{_layer_generic(name).removesuffix('.base_layer')}.{module.parameter_name}"
            parameters[key] = parameters.get(key, 0) + 1
        elif isinstance(module, LoraLayer):
            modules[_layer_generic(name)] = modules.get(_layer_generic(name), 0) + 1
    lines = [f"modules {', '.join(f'{n} x{c}' for n, c in modules.items()) or 'none'}"]
    if parameters:
        lines.append(f"parameters {', '.join(f'{n} x{c}' for n, c in parameters.items())} (one LoRA pair per expert)")
    return [*lines, count_parameters(model).line(), *_unquantized_lines(cfg, model)]


def _unquantized_lines(cfg: Config, model: torch.nn.Module) -> list[str]:
    """A 4-bit base: the expert and router tensors bitsandbytes leaves in the training precision. transformers 5.25
    replaces nn.Linear (and Conv1D) only (integrations/bitsandbytes.py replace_with_bnb_linear), so fused 3D experts
    load unquantized (docs/moe.md); the planner counts them so."""
    from dtrain import strategies
    from dtrain.strategies.targets import expert_tensors

    if "quantization" not in strategies.get(cfg.strategy).sections:
        return []
    names = set(expert_tensors(model))
    kept = sum(p.numel() for n, p in model.named_parameters() if n in names)
    if not kept:
        return []
    return [
        f"4-bit: nn.Linear weights only; {len(names)} expert and router tensors ({kept:,} parameters) stay "
        f"{cfg.train.precision} (transformers quantizes nn.Linear only: docs/moe.md)"
    ]


def _layer_generic(name: str) -> str:
    """A module name without its model prefix and layer number: base_model.model.model.layers.3.mlp -> mlp."""
    return name.split(".layers.", 1)[-1].split(".", 1)[-1] if ".layers." in name else name.split("model.")[-1]


def expert_adapter_problems(cfg: Config) -> list[str]:
    """What peft refuses about adapting this mixture-of-experts model, as config problems: found by building the
    adapter on the meta device (a check in seconds), not by a rank that crashes after the launch."""
    from peft import get_peft_model

    base = meta_model(cfg.model.local_dir(), cfg.model.trust_remote_code)
    config = peft_config(cfg.lora, cfg.model.path, base)
    if config.target_parameters and cfg.lora.dropout:
        return [
            f"lora.dropout: must be 0 when LoRA adapts expert parameters ({', '.join(config.target_parameters)}): "
            f"peft's ParamWrapper has no dropout, got {cfg.lora.dropout}"
        ]
    try:
        get_peft_model(base, config)
    except ValueError as e:
        return [f"lora.target_modules: peft cannot adapt this {type(base).__name__}: {str(e).splitlines()[0]}"]
    return []


def planned_report(cfg: Config) -> ParameterReport:
    """The count a run of `cfg` will print, from config.json alone (the model is built on the meta device)."""
    return count_parameters(meta_peft_model(cfg))


def meta_peft_model(cfg: Config) -> torch.nn.Module:
    """Base + adapters on the meta device: the names and shapes of every adapter tensor, no memory."""
    from peft import get_peft_model

    base = meta_model(cfg.model.local_dir(), cfg.model.trust_remote_code)
    # Same tensors whatever the init; pissa / olora would decompose meta weights for nothing.
    plain = dataclasses.replace(cfg.lora, init_lora_weights=True)
    return get_peft_model(base, peft_config(plain, cfg.model.path, base))


def expected_adapter_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Trained tensor name (as in the engine's module) -> shape, for the adapter of `cfg`."""
    model = meta_peft_model(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------------
# Export


def adapter_tensors(cfg: Config, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained adapter (engine names), in the training dtype, checked against the shapes the model implies.

    Raises ExportError listing every missing, unexpected, empty or mis-shaped tensor: a ZeRO-3 save that was not
    gathered writes `[0]`-shaped tensors without complaint, and such an adapter must never reach a user.
    """
    expected = expected_adapter_shapes(cfg)
    lazy, _, _ = lazy_engine_tensors(checkpoint)
    found = {name: t for name, t in lazy.items() if name in expected or ".lora_" in name or "modules_to_save" in name}
    problems = [f"{name}: missing from the checkpoint" for name in expected if name not in found]
    problems += [f"{name}: not part of this adapter config" for name in found if name not in expected]
    tensors: dict[str, torch.Tensor] = {}
    for name in (n for n in expected if n in found):
        tensor = found[name].contiguous()
        if tensor.numel() == 0:
            problems.append(f"{name}: empty tensor {tuple(tensor.shape)} (an ungathered ZeRO-3 partition?)")
        elif tuple(tensor.shape) != expected[name]:
            problems.append(f"{name}: shape {tuple(tensor.shape)}, expected {expected[name]}")
        else:
            tensors[name] = tensor.to(torch_dtype(cfg.train.precision))
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ExportError(f"{checkpoint}: refusing to write a broken adapter:\n{lines}")
    return tensors


def export_adapter(checkpoint: Path, cfg: Config, out: Path) -> ExportResult:
    """adapter_config.json + adapter_model.safetensors, loadable by `PeftModel.from_pretrained`."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    tensors = exported_tensors(cfg, checkpoint)
    # PEFT's file names drop the adapter name ("lora_A.default.weight" -> "lora_A.weight").
    peft_names = get_peft_model_state_dict(meta_peft_model(cfg), state_dict=tensors)
    # The base as the user named it (a repo id, or their path), never this machine's resolved folder.
    exported_peft_config(cfg).save_pretrained(str(out))
    copy_tokenizer(cfg, out)  # with the chat template the data was built with
    save_file({k: v.contiguous() for k, v in peft_names.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return ExportResult(out, ["adapter_config.json", ADAPTER_WEIGHTS], len(peft_names), peak_rss_mb())


def export_merged(
    checkpoint: Path, cfg: Config, out: Path, options: ExportOptions, nf4: dict[str, Any] | None = None
) -> ExportResult:
    """Base + adapter folded into the weights, as a standard HF model folder in the base's dtype (or
    options.dtype), written one base tensor at a time on the CPU (dtrain.merge): memory holds one output shard,
    never the model. `nf4` (qlora): the quantization the base was trained under, merged onto its dequantized
    weights — those the adapter was trained against."""
    from dtrain.merge import Merger, merge_to

    dtype = export_dtype(options.dtype, cfg.model.local_dir())
    merger = Merger(cfg.model.local_dir(), exported_tensors(cfg, checkpoint), cfg.lora.scale, dtype, nf4)
    files = merge_to(merger, out, options.max_shard_bytes, write_sharded)
    copy_model_files(cfg, out, dtype)
    return ExportResult(out, files, len(merger.names), peak_rss_mb())
