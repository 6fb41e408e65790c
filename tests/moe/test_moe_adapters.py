"""LoRA on a mixture of experts: expert tensors as targets, all-linear reaching every expert, the router frozen
unless named, `dtrain check` saying what is adapted with peft's own count; and (slow) a 2-rank ZeRO-3 adapter run
whose exported adapter, loaded by vanilla peft in a fresh process, reproduces the trained model's logits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, run_dtrain, write_config

BASE = "configs/tiny-lora.yaml"


def check(tmp_path, model_dir, *overrides):
    config = write_config(tmp_path / "cfg.yaml", model_dir, base=BASE)
    return run_dtrain("check", str(config), *overrides, in_process=True, check=False)


def peft_count(model_dir, **lora) -> tuple[int, int]:
    """(trainable, router adapter) parameters of vanilla peft's own LoRA on the model (meta device)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, **lora))
    router = sum(p.numel() for n, p in peft.named_parameters() if p.requires_grad and ".mlp.gate." in n)
    return peft.get_nb_trainable_parameters()[0], router


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_all_linear_adapts_every_expert_not_the_router_and_counts_as_peft(tmp_path, tiny_moe, model_type):
    model_dir = tiny_moe(model_type)
    refused = check(tmp_path, model_dir, "lora.target_modules=all-linear")  # the shipped dropout 0.05
    assert refused.returncode == 2
    assert "lora.dropout: must be 0 when LoRA adapts expert parameters (down_proj, gate_up_proj)" in refused.stderr
    result = check(tmp_path, model_dir, "lora.target_modules=all-linear", "lora.dropout=0")
    assert result.returncode == 0, result.stderr
    assert "adapted      modules self_attn.q_proj x2, self_attn.k_proj x2" in result.stdout
    assert "parameters mlp.experts.down_proj x2, mlp.experts.gate_up_proj x2" in result.stdout
    assert "mlp.gate" not in result.stdout  # the router stays frozen
    # peft's own all-linear (its transformers-4.x name mapping: experts and router) less the router's adapters
    everything, router = peft_count(model_dir, target_modules="all-linear")
    assert router > 0 and f"trainable parameters: {everything - router:,} of" in result.stdout


def test_expert_tensors_and_the_router_can_be_named(tmp_path, tiny_moe):
    model_dir = tiny_moe("qwen3_moe")
    result = check(tmp_path, model_dir, "lora.target_modules=[q_proj, experts.gate_up_proj, gate]", "lora.dropout=0")
    assert result.returncode == 0, result.stderr
    assert "parameters mlp.experts.gate_up_proj x2, mlp.gate.weight x2" in result.stdout
    trainable, _ = peft_count(model_dir, target_modules=["q_proj"], target_parameters=["gate_up_proj", "gate.weight"])
    assert f"trainable parameters: {trainable:,} of" in result.stdout
    unknown = check(tmp_path, model_dir, "lora.target_modules=[q_proj, experts.w9]", "lora.dropout=0")
    assert unknown.returncode == 2
    assert "lora.target_modules[1]: 'experts.w9' is no module of this Qwen3MoeForCausalLM" in unknown.stderr
    assert "its expert and router tensors: experts.down_proj, experts.gate_up_proj, gate.weight" in unknown.stderr


@pytest.mark.slow  # a 2-rank adapter training through the CLI and a vanilla-peft process
def test_expert_adapter_trained_on_two_ranks_loads_in_vanilla_peft_with_the_same_logits(tmp_path, tiny_moe):
    from dtrain import strategies
    from dtrain.config import load_config

    model_dir = tiny_moe("qwen3_moe")
    overrides = ["lora.target_modules=all-linear", "lora.dropout=0", "train.max_steps=3", "train.warmup_steps=1",
                 "checkpoint.every_steps=3", "eval.every_steps=0", "data.seq_len=128", "deepspeed.stage=3"]  # fmt: skip
    config = write_config(tmp_path / "cfg.yaml", model_dir, base=BASE)
    run_dtrain("train", str(config), *overrides, "--nproc", "2", timeout=600)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    run_dtrain("export", str(checkpoint), "--adapter", str(tmp_path / "adapter"))

    cfg = load_config(config, overrides)
    trained = strategies.get("lora").eval_model(cfg, checkpoint, torch.device("cpu"))
    input_ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save({"input_ids": input_ids}, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = trained(input_ids=input_ids, use_cache=False).logits.float()
        base = strategies.get("lora").eval_model(cfg, None, torch.device("cpu"))(input_ids=input_ids).logits.float()
    spec = f"adapter:{model_dir}:{tmp_path / 'adapter'}"
    cmd = [sys.executable, "-m", "tests.adapters.vanilla_logits", str(tmp_path / "batch.pt"), str(tmp_path / "l.pt")]
    subprocess.run([*cmd, spec], cwd=REPO, check=True, timeout=300)
    vanilla = torch.load(tmp_path / "l.pt")[spec]
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapter moved the model
    torch.testing.assert_close(vanilla, expected, rtol=1e-5, atol=1e-5)
