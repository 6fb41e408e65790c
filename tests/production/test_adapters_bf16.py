"""bf16 LoRA (ZeRO-3, paged 32-bit AdamW) and QLoRA (ZeRO-1, paged 8-bit AdamW: the 8B config's setup) with
gradient checkpointing under DeepSpeed on 2 gloo ranks; and what bf16 gradient accumulation costs.

Accumulation: at ZeRO stage 0 DeepSpeed 0.19.8 trains bf16 with no fp32 master weights and sums micro-batch
gradients in bf16 (it refuses `grad_accum_dtype: fp32` there); at stage 1 with `data_types.grad_accum_dtype: fp32`
(what dtrain generates for bf16) it keeps fp32 master weights and accumulates in fp32. With 8 micro batches per step,
as the 8B QLoRA config has, the stage-1 bf16 run stays much closer to an fp32 reference than the stage-0 one.
"""

from __future__ import annotations

import pytest
import torch

from dtrain.metrics import read_metrics
from tests.production.runs import STEPS

pytestmark = [pytest.mark.slow, pytest.mark.long]  # minutes of bf16 / CPU-Adam / NVMe runs: make test-all


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_bf16_adapters_with_checkpointing_and_paged_optimizers_learn(runs, name):
    losses = read_metrics(runs.run(name))
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1], losses
    weights = torch.load(runs.out(name) / "weights.pt")
    lora_b = [t for n, t in weights.items() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: every adapter was trained


def test_fp32_accumulation_tracks_the_fp32_reference_where_stage0_bf16_drifts(runs):
    reference = read_metrics(runs.run("accum-fp32"))
    stage0, stage1 = read_metrics(runs.run("accum-bf16-z0")), read_metrics(runs.run("accum-bf16-z1"))
    drift = {
        name: max(abs(run[s] - reference[s]) for s in range(2, STEPS + 1))
        for name, run in (("bf16 stage 0", stage0), ("bf16 stage 1 + fp32 accumulation", stage1))
    }
    print(f"largest loss gap to the fp32 reference over steps 2-{STEPS}: {drift}")
    assert drift["bf16 stage 1 + fp32 accumulation"] < drift["bf16 stage 0"] / 2, drift
