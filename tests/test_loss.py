"""Chunked cross-entropy (dtrain.loss) equals transformers' plain loss, in value and in every gradient (fp32)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dtrain.data import IGNORE
from dtrain.loss import chunks_for, install_chunked_loss

LLAMA3_8B = Path(__file__).resolve().parents[1] / "configs/models/llama-3-8b"
VOCAB, HIDDEN = 1000, 64  # 3 slices of a full model, 5 with a frozen base


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, **overrides)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


ROWS, SEQ_LEN = 2, 47
TOKENS = ROWS * SEQ_LEN


def packed_batch(rows: int = ROWS, seq_len: int = SEQ_LEN) -> dict[str, torch.Tensor]:
    """Two documents per row, position ids restarting at each, prompt tokens and padding labelled IGNORE."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (rows, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, :5] = IGNORE  # a prompt
    labels[:, 20:26] = IGNORE  # the second document's prompt
    labels[:, -7:] = IGNORE  # padding
    position_ids = torch.cat([torch.arange(20), torch.arange(seq_len - 20)]).repeat(rows, 1)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "use_cache": False}


def loss_and_grads(model, batch, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_chunked_equals_plain(model, **kwargs) -> None:
    batch = packed_batch()
    plain_loss, plain_grads = loss_and_grads(model, batch, **kwargs)
    assert install_chunked_loss(model, TOKENS) == chunks_for(model, TOKENS) > 1
    chunked_loss, chunked_grads = loss_and_grads(model, batch, **kwargs)
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert chunked_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)
    with torch.no_grad():  # eval: the same loss without checkpointing
        torch.testing.assert_close(model(**batch, **kwargs).loss, plain_loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("token_sum", [False, True])
def test_full_model(tied, token_sum):
    """token_sum: the trainer's num_items_in_batch (sum / global label count) instead of the per-batch mean."""
    kwargs = {"num_items_in_batch": torch.tensor(123.0)} if token_sum else {}
    assert_chunked_equals_plain(tiny_llama(tie_word_embeddings=tied), **kwargs)


@pytest.mark.parametrize("lm_head", ["lora", "modules_to_save"])
def test_peft_model(lm_head):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "v_proj"] + (["lm_head"] if lm_head == "lora" else [])
    saved = ["lm_head"] if lm_head == "modules_to_save" else None
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=targets, modules_to_save=saved))
    for name, param in peft_model.named_parameters():  # non-zero B, so every adapter gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    assert_chunked_equals_plain(peft_model, num_items_in_batch=torch.tensor(50.0))


def test_without_labels_the_plain_forward_runs():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    install_chunked_loss(model, TOKENS)
    batch = {k: v for k, v in packed_batch().items() if k != "labels"}
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)


def test_where_it_applies():
    assert chunks_for(tiny_llama(), TOKENS) == 3
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # Llama-3-8B in bf16: 1.5 MB of plain loss per token, ~8x what one layer keeps
        llama3 = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(LLAMA3_8B), dtype=torch.bfloat16)
    # a micro batch of 4,096 tokens: 8 slices; of 512: the plain loss (0.8 GB) needs less than the head's gradients
    assert chunks_for(llama3, 4096) == 8 and chunks_for(llama3, 512) == 1
    from transformers import GemmaConfig, GemmaForCausalLM  # logit soft-capping family: plain forward kept

    config = GemmaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, intermediate_size=64, vocab_size=256)  # fmt: skip
    gemma = GemmaForCausalLM(config)
    assert chunks_for(gemma, TOKENS) == 1 and install_chunked_loss(gemma, TOKENS) == 1


def test_zero3_partitioned_head_untied_and_tied(tmp_path):
    """2 gloo ranks, every parameter partitioned: DeepSpeed gathers lm_head (or the tied embedding) for each slice and
    for its recomputation, and the assembled gradients equal the plain loss's (~25 s, one launch for both cases)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = os.environ | {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(repo / "tests/loss_zero3_worker.py"), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for tied in (False, True):
            (plain_loss, plain_grads), (chunked_loss, chunked_grads) = result[(tied, False)], result[(tied, True)]
            assert chunked_loss == pytest.approx(plain_loss, rel=1e-6)
            for name, grad in plain_grads.items():
                assert grad.abs().sum() > 0, name
                torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)
