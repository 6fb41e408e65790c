"""The attention kernel `auto` picks (dtrain.attention): flash-attn varlen on CUDA when it can run, else sdpa."""

from __future__ import annotations

import pytest
import torch

from dtrain.attention import choose_attention

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    "configured, device, dtype, packing, flash, expected",
    [
        ("auto", "cuda", BF16, True, True, "flash_attention_2"),
        ("auto", "cuda", torch.float16, False, True, "flash_attention_2"),
        ("auto", "cuda", BF16, True, False, "sdpa"),  # flash-attn not installed
        ("auto", "cuda", FP32, True, True, "sdpa"),  # flash-attn has no fp32 kernel
        ("auto", "cpu", BF16, True, True, "sdpa"),
        ("eager", "cuda", BF16, True, True, "eager"),  # an explicit choice is kept
        ("sdpa", "cuda", BF16, True, True, "sdpa"),
    ],
)
def test_choice(configured, device, dtype, packing, flash, expected):
    choice = choose_attention(configured, device, dtype, packing, flash)
    assert choice.implementation == expected
    assert choice.line().startswith(f"attention: {expected} (") and choice.reason


def test_check_names_the_choice_for_this_machine(tmp_path, tiny_model):
    """`dtrain check` prints what a run of the config would take here: sdpa on this CPU machine (~10 s)."""
    from tests.helpers import run_dtrain, write_config

    config = write_config(tmp_path / "cfg.yaml", tiny_model)
    out = run_dtrain("check", str(config)).stdout
    expected = "sdpa (flash-attn kernels need CUDA; this is cpu)" if not torch.cuda.is_available() else ""
    assert f"  attention    {expected}" in out, out
