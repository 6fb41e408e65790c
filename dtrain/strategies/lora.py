"""strategy: lora — peft adapters on a frozen base in the training precision (partitioned at load under ZeRO-3)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtrain.plan.shape import (
    ModelShape,
    ParamCounts,
    PlanTerms,
    lora_targets,
    lora_trainable_params,
    trained_bias_params,
)
from dtrain.strategies.protocol import BuiltModel, CheckpointOptions, ExportOptions

if TYPE_CHECKING:
    import torch

    from dtrain.config import Config
    from dtrain.dist import DistEnv
    from dtrain.export import ExportResult

# DeepSpeed saves only what requires grad. Loading is not strict: the frozen base is absent from the checkpoint, and
# bitsandbytes' quant-state entries (absmax, quant_map, ...), should a checkpoint hold them, make DeepSpeed's strict
# load fail with "Unexpected key(s)". The base is rebuilt from model.path, so nothing is lost.
ADAPTER_CHECKPOINT = CheckpointOptions(save={"exclude_frozen_parameters": True}, load={"load_module_strict": False})


class Lora:
    name = "lora"
    export_kinds = ("adapter", "merged")
    checkpoint = ADAPTER_CHECKPOINT
    sections = ("lora",)

    def config_problems(self, cfg: Config) -> list[str]:
        return cfg.lora.problems()

    def zero_problems(self, stage: int, offload_optimizer: str, offload_param: str) -> list[str]:
        return []

    def model_problems(self, cfg: Config) -> list[str]:
        from dtrain.strategies.targets import expert_problems, target_problems

        return target_problems(cfg) or expert_problems(cfg)

    def layout_problems(self, cfg: Config, nnodes: int) -> list[str]:
        return []

    def build(self, cfg: Config, env: DistEnv, ds_config: dict[str, Any]) -> BuiltModel:
        """The base in the training precision (partitioned at load under ZeRO-3), adapters on top."""
        from dtrain.strategies import peft_adapters
        from dtrain.strategies.loading import load_pretrained

        model, keepalive = load_pretrained(cfg, ds_config, env.device)
        model = peft_adapters.add_adapters(model, cfg)
        peft_adapters.report_trainable(model, cfg, env)
        peft_adapters.keep_initial_adapter(model, cfg, env)
        return BuiltModel(model, keepalive)

    def export(self, kind: str, checkpoint: Path, cfg: Config, out: Path, options: ExportOptions) -> ExportResult:
        from dtrain.strategies import peft_adapters

        if kind == "adapter":
            return peft_adapters.export_adapter(checkpoint, cfg, out)
        return peft_adapters.export_merged(checkpoint, cfg, out, options)

    def eval_model(self, cfg: Config, checkpoint: Path | None, device: torch.device) -> torch.nn.Module:
        from dtrain.strategies.loading import load_for_eval

        return with_trained_adapter(load_for_eval(cfg, device), cfg, checkpoint)

    def plan_terms(self, shape: ModelShape, cfg: Config) -> PlanTerms:
        counts = ParamCounts(adapter_params(shape, cfg), frozen_params(shape, cfg), 0, shape.largest_layer_params)
        return PlanTerms(counts, cfg.train.optimizer, cfg.train.precision, lora_targets(shape, cfg.lora.target_modules))


def with_trained_adapter(base: torch.nn.Module, cfg: Config, checkpoint: Path | None) -> torch.nn.Module:
    """`base` with the adapter `checkpoint` trained (peft's model, as in training), in eval mode; None: `base`."""
    from dtrain.strategies import peft_adapters
    from dtrain.strategies.loading import load_trained

    if checkpoint is None:
        return base
    model = peft_adapters.add_adapters(base, cfg)
    load_trained(model, peft_adapters.adapter_tensors(cfg, checkpoint), checkpoint)
    return model.eval()


def adapter_params(shape: ModelShape, cfg: Config) -> int:
    return lora_trainable_params(shape, cfg.lora)


def frozen_params(shape: ModelShape, cfg: Config) -> int:
    """The base stays whole beside the adapters and modules_to_save copies; only trained biases leave it."""
    return shape.total_params - trained_bias_params(shape, cfg.lora, lora_targets(shape, cfg.lora.target_modules))


LORA = Lora()
