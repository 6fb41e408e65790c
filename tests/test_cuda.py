"""GPU runs of the same code path (CUDA + NCCL + bf16). Skipped on machines without CUDA, such as CI."""

from __future__ import annotations

import pytest
import torch

from dtrain.metrics import read_metrics
from tests.helpers import run_dtrain, write_config

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.slow,  # trainings through the CLI
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_full_zero3_bf16_on_gpu(tmp_path, tiny_model, offload):
    nproc = min(2, torch.cuda.device_count())
    config = write_config(
        tmp_path / "cfg.yaml",
        tiny_model,
        **{
            "train.precision": "bf16",
            "train.max_steps": 8,
            "deepspeed.offload_optimizer.device": offload,
            "deepspeed.offload_param.device": offload,
        },
    )
    out = run_dtrain("train", str(config), "--nproc", str(nproc))
    assert "saved" in out.stdout
    losses = read_metrics(tmp_path / "run")
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]
