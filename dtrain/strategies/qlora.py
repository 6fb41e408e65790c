"""strategy: qlora — peft adapters on a base quantized to 4 bit (bitsandbytes NF4/FP4) while loading; one node.

transformers does not partition a quantized model at load time, so every rank loads the (small) 4-bit base; under
ZeRO-3, DeepSpeed partitions it in `deepspeed.initialize`. The 4-bit weights cannot be offloaded, and the base is
not sharded across nodes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtrain.config.model import mutates_base
from dtrain.plan.shape import ModelShape, ParamCounts, PlanTerms, lora_targets, nf4_tensor_bytes
from dtrain.strategies import lora
from dtrain.strategies.protocol import BuiltModel, ExportOptions

if TYPE_CHECKING:
    import torch

    from dtrain.config import Config
    from dtrain.dist import DistEnv
    from dtrain.export import ExportResult


class QLora:
    name = "qlora"
    export_kinds = ("adapter", "merged")
    checkpoint = lora.ADAPTER_CHECKPOINT
    sections = ("lora", "quantization")

    def config_problems(self, cfg: Config) -> list[str]:
        init = cfg.lora.init_lora_weights
        if mutates_base(init):
            return [
                *cfg.lora.problems(),
                f"lora.init_lora_weights: {init} decomposes the full-precision base weight, which qlora never holds "
                "(peft refuses a 4-bit weight; QPiSSA would need the residual re-quantized and saved): use strategy "
                "lora",
            ]
        return cfg.lora.problems()

    def zero_problems(self, stage: int, offload_optimizer: str, offload_param: str) -> list[str]:
        if offload_param != "none":
            return ["deepspeed.offload_param.device: a 4-bit base cannot be offloaded; use none with qlora"]
        return []

    def model_problems(self, cfg: Config) -> list[str]:
        return lora.LORA.model_problems(cfg)

    def layout_problems(self, cfg: Config, nnodes: int) -> list[str]:
        """The 4-bit base is loaded whole on every rank; bitsandbytes' quantized weights are not sharded across
        nodes."""
        if nnodes > 1:
            return [
                f"strategy: qlora runs on a single node, but the launch asks for {nnodes} nodes (use nnodes 1, or lora)"
            ]
        return []

    def build(self, cfg: Config, env: DistEnv, ds_config: dict[str, Any]) -> BuiltModel:
        """The base quantized while loading, prepared for k-bit training, adapters on top."""
        from dtrain.strategies import peft_adapters
        from dtrain.strategies.loading import load_pretrained

        model, keepalive = load_pretrained(cfg, ds_config, env.device, quantization_config=bnb_config(cfg))
        model = peft_adapters.add_adapters(prepared_base(model, cfg, env.device), cfg)
        keep_only_tensors_in_state_dict(model)
        peft_adapters.report_trainable(model, cfg, env)
        return BuiltModel(model, keepalive)

    def export(self, kind: str, checkpoint: Path, cfg: Config, out: Path, options: ExportOptions) -> ExportResult:
        from dtrain.merge import nf4_settings
        from dtrain.strategies import peft_adapters

        if kind == "adapter":
            return peft_adapters.export_adapter(checkpoint, cfg, out)
        nf4 = nf4_settings(cfg.quantization.quant_type, cfg.quantization.double_quant)
        return peft_adapters.export_merged(checkpoint, cfg, out, options, nf4=nf4)

    def eval_model(self, cfg: Config, checkpoint: Path | None, device: torch.device) -> torch.nn.Module:
        from dtrain.strategies.loading import load_for_eval

        base = prepared_base(load_for_eval(cfg, device, quantization_config=bnb_config(cfg)), cfg, device)
        return lora.with_trained_adapter(base.eval(), cfg, checkpoint)

    def plan_terms(self, shape: ModelShape, cfg: Config) -> PlanTerms:
        """The decoder's nn.Linear weights in 4 bit; everything else, a sparse block's experts included, in the
        compute dtype (transformers quantizes nn.Linear only: docs/moe.md)."""
        linears = shape.linear_counts().values()
        quantized = sum(nf4_tensor_bytes(i * o, cfg.quantization.double_quant) * n for i, o, n in linears)
        counts = ParamCounts(
            lora.adapter_params(shape, cfg),
            lora.frozen_params(shape, cfg) - shape.quantizable_params,
            quantized,
            shape.largest_layer_params,
        )
        return PlanTerms(
            counts,
            cfg.train.optimizer,
            cfg.quantization.compute_dtype,
            lora_targets(shape, cfg.lora.target_modules),
            dequantized_elements=max(i * o for i, o, _ in linears),
        )


def prepared_base(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """The freshly quantized base as the adapters train on it: repacking off, prepared for k-bit training (its
    non-quantized weights in fp32)."""
    from peft import prepare_model_for_kbit_training

    disable_cpu_weight_repacking(model, device)
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=cfg.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def bnb_config(cfg: Config) -> Any:
    from transformers import BitsAndBytesConfig

    from dtrain.tables import torch_dtype

    q = cfg.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
    )


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


QLORA = QLora()
