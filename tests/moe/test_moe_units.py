"""Mixture-of-experts without a process group: the family traits against the models' own structure, the router's
balancing loss against transformers' own, ZeRO-3 leaf detection. Each test builds tiny real transformers models."""

from __future__ import annotations

import json

import pytest
import torch

from dtrain.config import load_config
from dtrain.families import moe_traits, sparse_blocks, zero3_leaf_classes
from dtrain.moe import RouterLoss
from tests.helpers import write_config
from tests.moe.models import FAMILIES

WITH_AUX_LOSS = ("qwen3_moe", "mixtral", "gpt_oss")  # DeepSeek-V3 balances with a routing bias, no loss term
# gpt-oss's attention sinks have no sdpa path in transformers 5.25 (attn_implementation auto would pick sdpa)
ATTENTION = {"gpt_oss": "eager"}


def load(tmp_path, model_dir, **keys):
    """The model as a rank loads it (dtrain.strategies.loading), ZeRO off, for a run config with `keys` set."""
    from dtrain.strategies.loading import load_pretrained

    attention = ATTENTION.get(json.loads((model_dir / "config.json").read_text())["model_type"], "auto")
    config = write_config(tmp_path / "cfg.yaml", model_dir, **{"model.attn_implementation": attention, **keys})
    cfg = load_config(config, check_paths=False)
    return load_pretrained(cfg, {"zero_optimization": {"stage": 0}}, torch.device("cpu"))[0]


def batch(vocab_size: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_traits_match_the_model_structure(tiny_moe, model_type):
    """The config keys the traits table reads say what the built model holds: experts per block, top-k, and which
    layers are sparse (a module holding a router and experts); fused experts need no ZeRO-3 leaf."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_moe(model_type))
    traits = moe_traits(model.config.to_dict())
    blocks = sparse_blocks(model)
    layers = tuple(i for i, layer in enumerate(model.model.layers) if any(b is layer.mlp for b in blocks))
    assert traits.sparse_layers == layers and layers
    for block in blocks:
        experts = block.experts
        assert experts.num_experts == traits.num_experts
        assert next(experts.parameters()).shape[0] == traits.num_experts  # fused: one 3D parameter per projection
    assert traits.experts_per_token == model.config.num_experts_per_tok
    assert zero3_leaf_classes(model) == []
    assert (traits.aux_coef_key is not None) == (model_type in WITH_AUX_LOSS)


def test_separate_expert_modules_are_found_as_zero3_leaves():
    """transformers 4.x / remote-code layout: experts in a ModuleList beside a router, one block per layer."""

    class Block(torch.nn.Module):  # the shape of transformers 4.x's MixtralSparseMoeBlock
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 4, bias=False)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    class Dense(torch.nn.Module):  # a router-less MLP with a list of layers is no sparse block
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(8, 8)])

    model = torch.nn.Sequential(Block(), Dense(), Block())
    assert zero3_leaf_classes(model) == [Block]


@pytest.mark.parametrize("model_type", WITH_AUX_LOSS)
def test_aux_loss_equals_transformers_and_the_lm_loss_stays_plain(tmp_path, tiny_moe, model_type):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = load(tmp_path, tiny_moe(model_type), **{"model.router_aux_loss_coef": 0.5})
    router = RouterLoss.of(model)
    assert router is not None and router.coef == 0.5
    inputs = batch(model.config.vocab_size)
    torch.manual_seed(0)
    plain = model(**inputs).loss
    torch.manual_seed(0)
    output = model(**inputs, **router.forward_kwargs)
    expected_aux = load_balancing_loss_func(output.router_logits, router.num_experts, router.experts_per_token)
    stats = router.step_stats(output)
    assert stats[0].item() == pytest.approx(expected_aux.item(), rel=1e-6) and stats[0] > 0
    assert output.loss.item() == pytest.approx(plain.item() + 0.5 * expected_aux.item(), rel=1e-6)
    assert router.lm_loss(output).item() == pytest.approx(plain.item(), rel=1e-6)
    tokens = inputs["input_ids"].numel()
    counts = stats[1:].reshape(len(router.sparse_layers), router.num_experts)
    assert counts.sum(dim=1).tolist() == [tokens * router.experts_per_token] * len(router.sparse_layers)
    scalars = router.scalars(stats.tolist(), micro_batches=1)
    assert scalars["aux_loss"] == pytest.approx(expected_aux.item(), rel=1e-6)
    assert scalars["expert_load_max_over_mean"] >= 1.0


@pytest.mark.parametrize("model_type", [*WITH_AUX_LOSS, "deepseek_v3"])
def test_coefficient_zero_or_a_family_without_aux_loss_trains_the_plain_loss(tmp_path, tiny_moe, model_type):
    coef = 0.0 if model_type in WITH_AUX_LOSS else None
    model = load(tmp_path, tiny_moe(model_type), **{"model.router_aux_loss_coef": coef})
    assert RouterLoss.of(model) is None


def test_model_default_coefficient_is_config_json(tmp_path, tiny_moe):
    model = load(tmp_path, tiny_moe("mixtral"))
    assert RouterLoss.of(model).coef == moe_traits(model.config.to_dict()).aux_coef == 0.001
