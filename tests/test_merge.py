"""Bounded-memory merge (dtrain.merge): tensor by tensor from the base's safetensors, equal to peft's whole-model
merge (lora onto the base, qlora onto the dequantized NF4 base), in the base's dtype by default."""

from __future__ import annotations

import pytest
import torch

from dtrain.config import Config
from dtrain.export import write_sharded
from dtrain.merge import Merger, merge_to, nf4_settings


def random_adapter(tiny_model, strategy: str) -> tuple[Config, dict[str, torch.Tensor]]:
    from dtrain.strategies.peft_adapters import expected_adapter_shapes

    cfg = Config(strategy=strategy)
    cfg.model.path = str(tiny_model)
    generator = torch.Generator().manual_seed(0)
    shapes = expected_adapter_shapes(cfg)
    return cfg, {name: torch.randn(shape, generator=generator) * 0.05 for name, shape in shapes.items()}


def peft_merge(cfg: Config, adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole-model merge: the fp32 base (qlora: `dequantize()` of the NF4-loaded base) + peft merge_and_unload."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from dtrain.strategies.peft_adapters import peft_config
    from dtrain.strategies.qlora import bnb_config, disable_cpu_weight_repacking

    if cfg.strategy == "qlora":
        base = AutoModelForCausalLM.from_pretrained(cfg.model.path, quantization_config=bnb_config(cfg),
                                                    dtype=torch.float32)  # fmt: skip
        disable_cpu_weight_repacking(base, torch.device("cpu"))
        base = base.dequantize(dtype=torch.float32)
        base.is_loaded_in_4bit = False
    else:
        base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    model = get_peft_model(base, peft_config(cfg.lora, cfg.model.path))
    model.load_state_dict(adapter, strict=False)
    return model.merge_and_unload().state_dict()


@pytest.mark.parametrize("strategy", ["lora", "qlora"])
def test_merge_tensor_by_tensor_equals_peft_merge(tiny_model, strategy):
    cfg, adapter = random_adapter(tiny_model, strategy)
    q = cfg.quantization
    nf4 = nf4_settings(q.quant_type, q.double_quant) if strategy == "qlora" else None
    merger = Merger(tiny_model, adapter, cfg.lora.alpha / cfg.lora.r, torch.float32, nf4)
    reference = peft_merge(cfg, adapter)
    assert sorted(merger.names) == sorted(reference)
    assert len(merger.lora) == 8  # q/k/v/o of 2 layers
    for name in merger.names:
        torch.testing.assert_close(merger.materialize(name), reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_merge_writes_the_output_dtype_shard_by_shard(tmp_path, tiny_model):
    cfg, adapter = random_adapter(tiny_model, "lora")
    merger = Merger(tiny_model, adapter, 2.0, torch.bfloat16)
    held = []
    files = merge_to(merger, tmp_path, 100_000, write_sharded, on_shard=lambda: held.append(len(held)))
    assert len(files) > 1 and len(held) == len(files)
    from safetensors.torch import load_file

    merged = {k: v for f in files for k, v in load_file(tmp_path / f).items()}
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
