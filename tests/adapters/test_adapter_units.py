"""lora / qlora without a process group: config mapping, parameter counts (tiny and Llama-3-8B-shaped, from
config.json alone), `dtrain check` problems, the bitsandbytes CPU workaround, gradient checkpointing, bnb optimizers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtrain import strategies
from dtrain.config import Config, LoraConfig, config_from_dict
from dtrain.dist import DistEnv
from dtrain.strategies.lora import ADAPTER_CHECKPOINT
from dtrain.strategies.peft_adapters import (
    add_adapters,
    count_parameters,
    peft_config,
    planned_report,
)
from dtrain.strategies.qlora import bnb_config, disable_cpu_weight_repacking
from dtrain.strategies.targets import target_problems
from tests.helpers import REPO, run_dtrain, write_config

CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
STAGE0 = {"zero_optimization": {"stage": 0}}
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}  # fmt: skip


def adapter_cfg(model_path: Path, strategy: str = "lora", tmp: Path | None = None, **lora) -> Config:
    cfg = Config(output_dir=str(tmp or model_path), strategy=strategy)
    cfg.model.path = str(model_path)
    cfg.train.precision = "fp32"
    for key, value in lora.items():
        setattr(cfg.lora, key, value)
    return cfg


@pytest.fixture(scope="module")
def llama3_8b(tmp_path_factory) -> Path:
    """A Llama-3-8B-shaped model directory with config.json only: no weights."""
    folder = tmp_path_factory.mktemp("llama3-8b-shape")
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    return folder


def test_defaults_are_the_widely_used_lora_settings():
    peft = peft_config(LoraConfig())
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, peft.bias) == (16, 32, 0.05, "none")
    assert set(peft.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    quant = bnb_config(Config())
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16


def test_a_4096_square_projection_at_rank_8_trains_65536_parameters():
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    with torch.device("meta"):
        model = torch.nn.Sequential()
        model.add_module("proj", torch.nn.Linear(4096, 4096, bias=False))
    model.requires_grad_(False)
    model = inject_adapter_in_model(PeftLoraConfig(r=8, target_modules=["proj"]), model)
    report = count_parameters(model)
    assert report.trainable == 65_536 and report.total == 4096 * 4096 + 65_536
    assert 1 - report.trainable / (4096 * 4096) == pytest.approx(0.996, abs=5e-4)  # 99.6 % fewer than the matrix


def test_tiny_model_report(tiny_model, tmp_path):
    report = planned_report(adapter_cfg(tiny_model))
    assert (report.trainable, report.total) == (14_336, 153_920)  # 2 layers x r16 x (q 128 + k 96 + v 96 + o 128)


def test_llama3_8b_shaped_report_from_config_alone(llama3_8b):
    qlora = planned_report(adapter_cfg(llama3_8b, "qlora"))
    assert qlora.trainable == 13_631_488  # 32 x 16 x (q 8192 + k 5120 + v 5120 + o 8192)
    assert qlora.total == 8_030_261_248 + 13_631_488
    assert qlora.percent == pytest.approx(0.16946, abs=1e-4)
    every_linear = planned_report(adapter_cfg(llama3_8b, target_modules="all-linear"))
    assert every_linear.trainable == 41_943_040  # + gate/up 16 x 18432, down 16 x 18432 per layer; not lm_head


def test_unknown_target_module_and_module_to_save_are_named(tiny_model, llama3_8b):
    cfg = adapter_cfg(tiny_model, target_modules=["q_proj", "query_key_value", "act_fn"], modules_to_save=["head"])
    problems = target_problems(cfg)
    assert len(problems) == 3
    assert problems[0].startswith("lora.target_modules[1]: 'query_key_value' is no module of this LlamaForCausalLM")
    assert "gate_proj" in problems[0] and "all-linear" in problems[0]
    assert problems[1].startswith("lora.target_modules[2]: 'act_fn' is a SiLUActivation")
    assert problems[2].startswith("lora.modules_to_save[0]: 'head' is no module")
    assert target_problems(adapter_cfg(tiny_model, target_modules="all-linear", modules_to_save=["lm_head"])) == []
    assert target_problems(adapter_cfg(llama3_8b, "qlora")) == []
    full = adapter_cfg(tiny_model, target_modules=["nope"])
    full.strategy = "full"
    assert strategies.get("full").model_problems(full) == []


def test_a_launch_reads_the_cached_module_list_without_importing_transformers(tiny_model, tmp_path, monkeypatch):
    """The first check builds the model on the meta device and caches its modules, keyed by config.json: the next
    launch of that model checks its LoRA targets from the cache, with neither transformers nor torch imported; a
    changed config.json is built again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    config = write_config(tmp_path / "cfg.yaml", tiny_model, base="configs/tiny-lora.yaml")
    assert run_dtrain("check", str(config), in_process=True).returncode == 0
    cached = list((tmp_path / "user-cache" / "dtrain" / "modules").glob("*.json"))
    assert len(cached) == 1
    launch = f"""
import sys
from dtrain.config import ConfigError
from dtrain.preflight import Launch, preflight
try:
    preflight({str(config)!r}, ["lora.target_modules=[q_proj,nope]"], Launch(1, 2))
except ConfigError as e:
    print(e.problems)
print(sorted({{"transformers", "torch"}} & set(sys.modules)))
"""
    proc = subprocess.run([sys.executable, "-c", launch], capture_output=True, text=True, cwd=REPO)
    problems, imported = proc.stdout.strip().splitlines()
    assert "lora.target_modules[1]: 'nope' is no module of this LlamaForCausalLM" in problems, proc.stderr[-2000:]
    assert imported == "[]"

    changed = tmp_path / "deeper"
    changed.mkdir()
    shape = json.loads((tiny_model / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**shape, "num_hidden_layers": shape["num_hidden_layers"] + 1}))
    assert target_problems(adapter_cfg(changed, tmp=tmp_path / "run", target_modules=["q_proj"])) == []
    assert len(list(cached[0].parent.glob("*.json"))) == 2


def test_rank_zero_and_qlora_across_nodes_are_refused_naming_the_key(tiny_model):
    raw = {
        "output_dir": "/tmp/x", "strategy": "qlora", "model": {"path": str(tiny_model)},
        "lora": {"r": 0}, "data": {"datasets": [{"path": "data/sample/text.jsonl"}]},
        "train": {"max_steps": 1, "gradient_accumulation_steps": 1},
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"lora\.r: must be > 0, got 0"):
        config_from_dict(raw, check_paths=False)
    cfg = adapter_cfg(tiny_model, "qlora")
    qlora, lora = strategies.get("qlora"), strategies.get("lora")
    assert qlora.layout_problems(cfg, nnodes=1) == []
    (problem,) = qlora.layout_problems(cfg, nnodes=2)
    assert problem.startswith("strategy: qlora runs on a single node") and "2 nodes" in problem
    cfg.strategy = "lora"
    assert lora.layout_problems(cfg, nnodes=4) == []


def test_cpu_workaround_is_applied_on_cpu_only():
    from bitsandbytes.nn import Linear4bit

    model = torch.nn.Sequential(Linear4bit(64, 32), torch.nn.Linear(32, 32), Linear4bit(32, 64))
    for layer in (model[0], model[2]):
        layer.support_avx512bf16_for_cpu = True
    assert disable_cpu_weight_repacking(model, torch.device("cuda", 0)) == 0
    assert model[0].support_avx512bf16_for_cpu and model[2].support_avx512bf16_for_cpu
    assert disable_cpu_weight_repacking(model, torch.device("cpu")) == 2
    assert not model[0].support_avx512bf16_for_cpu and not model[2].support_avx512bf16_for_cpu


def _qlora_grads(cfg: Config, workaround: bool, eval_first: bool) -> tuple[float, dict[str, torch.Tensor]]:
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, quantization_config=bnb_config(cfg))
    if workaround:
        disable_cpu_weight_repacking(model, torch.device("cpu"))
    model = add_adapters(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), cfg)
    ids = torch.arange(5, 69).reshape(2, 32)
    if eval_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_an_eval_pass_leaves_qlora_training_bitwise_unchanged_with_the_workaround(tiny_model):
    """The trap itself, in one process: without the setting, the eval pass repacks the 4-bit weights and the next
    training step loses its input gradients (on CPUs with AVX512-BF16, like the CI machines)."""
    from bitsandbytes.functional import has_avx512bf16

    cfg = adapter_cfg(tiny_model, "qlora", dropout=0.0)
    loss, grads = _qlora_grads(cfg, workaround=True, eval_first=False)
    loss_after_eval, grads_after_eval = _qlora_grads(cfg, workaround=True, eval_first=True)
    assert len(grads) == 16  # every adapter tensor got a gradient: the comparisons below are not vacuous
    assert loss_after_eval == loss and all(torch.equal(grads[k], grads_after_eval[k]) for k in grads)
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: the trap cannot be shown here (the workaround is harmless)")
    loss_trapped, grads_trapped = _qlora_grads(cfg, workaround=False, eval_first=True)
    assert loss_trapped != loss
    assert not all(torch.equal(grads[k], grads_trapped[k]) for k in grads)


def _three_steps(built_model: torch.nn.Module, cfg: Config) -> list[float]:
    from dtrain.optim import build_optimizer

    optimizer = build_optimizer(cfg.train, built_model)
    ids = torch.arange(5, 69).reshape(2, 32)
    losses = []
    for _ in range(3):
        loss = built_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_build_qlora_gradient_checkpointing_gives_the_same_losses(tiny_model, tmp_path, capsys):
    from bitsandbytes.nn import Linear4bit

    cfg = adapter_cfg(tiny_model, "qlora", tmp=tmp_path)
    cfg.train.lr = 1e-2
    losses = {}
    for checkpointing in (False, True):
        cfg.model.gradient_checkpointing = checkpointing
        torch.manual_seed(0)
        model = strategies.get("qlora").build(cfg, CPU, STAGE0).module
        assert strategies.get("qlora").checkpoint == ADAPTER_CHECKPOINT
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert len(layers) == 14 and not any(m.support_avx512bf16_for_cpu for m in layers)
        assert not [k for k in model.state_dict() if "absmax" in k or "quant_map" in k]  # base stays out of saves
        losses[checkpointing] = _three_steps(model, cfg)
    assert losses[True] == losses[False] and losses[True][-1] < losses[True][0]
    assert "qlora r=16 alpha=32 on q_proj,k_proj,v_proj,o_proj: trainable parameters: 14,336 of 153,920" in (
        capsys.readouterr().out
    )
    assert json.loads((tmp_path / "trainable_parameters.json").read_text())["trainable"] == 14_336


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_lora_trains_with_bitsandbytes_optimizers(tiny_model, tmp_path, optimizer):
    # r=64: adapter tensors of 4,096+ elements, which bitsandbytes keeps in 8 bit (smaller ones stay 32-bit)
    cfg = adapter_cfg(tiny_model, "lora", tmp=tmp_path, target_modules="all-linear", r=64, alpha=128)
    cfg.train.optimizer, cfg.train.lr = optimizer, 1e-2
    model = strategies.get("lora").build(cfg, CPU, STAGE0).module
    losses = _three_steps(model, cfg)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=["q_proj", "v_proj"], use_dora=True, modules_to_save=["lm_head", "norm"]),
        dict(target_modules=["embed_tokens", "q_proj"], use_rslora=True),
    ],
    ids=["dora-with-saved-head-and-norm", "embedding-adapter"],
)
def test_loraplus_learning_rates_equal_peft_create_loraplus_optimizer(tiny_model, tmp_path, lora):
    """Every trained tensor gets the learning rate peft's own LoRA+ optimizer gives it (B and 1-D tensors at
    lr x ratio, embedding adapters at peft's 1e-6); weight decay stays dtrain's (no decay on 1-D tensors)."""
    from peft.optimizers import create_loraplus_optimizer

    from dtrain.optim import build_optimizer

    cfg = adapter_cfg(tiny_model, "lora", tmp=tmp_path, loraplus_lr_ratio=16.0, **lora)
    cfg.train.lr, cfg.train.weight_decay = 2e-4, 0.1
    model = strategies.get("lora").build(cfg, CPU, STAGE0).module
    ours = build_optimizer(cfg.train, model, cfg.lora.loraplus_lr_ratio)
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16.0)

    def rates(optimizer) -> dict[str, float]:
        by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        return {name: by_id[id(p)] for name, p in model.named_parameters() if p.requires_grad}

    assert rates(ours) == rates(theirs)
    assert {round(r / 2e-4, 6) for r in rates(ours).values()} >= {1.0, 16.0}
    decay = {id(p): g["weight_decay"] for g in ours.param_groups for p in g["params"]}
    assert all(decay[id(p)] == (0.0 if p.ndim == 1 else 0.1) for p in model.parameters() if p.requires_grad)
