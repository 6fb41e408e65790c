"""The generated DeepSpeed config: concrete numbers for every stage/offload combination, accepted by DeepSpeed."""

from __future__ import annotations

import itertools
import json

import pytest

from dtrain.config import config_from_dict, zero_layout_problems
from dtrain.config.deepspeed import OFFLOAD_DEVICES, ZERO_STAGES
from dtrain.ds_config import build_deepspeed_config
from dtrain.layout import BatchLayout

COMBOS = [
    combo
    for combo in itertools.product(ZERO_STAGES, OFFLOAD_DEVICES, OFFLOAD_DEVICES)
    if not zero_layout_problems(*combo)
]


def test_the_layout_rule_admits_the_16_combinations_deepspeed_runs():
    assert len(COMBOS) == 16
    assert ("deepspeed.offload_param.device: parameter offload needs deepspeed.stage 3, got 2",) == tuple(
        zero_layout_problems(2, "none", "cpu")
    )


def make_cfg(stage, opt, param, **train):
    offload = lambda d: {"device": d, **({"nvme_path": "/local_nvme"} if d == "nvme" else {})}  # noqa: E731
    raw = {
        "output_dir": "run",
        "model": {"path": "m"},
        "data": {"datasets": [{"path": "d.jsonl"}]},
        "train": {"max_steps": 10, "micro_batch_size": 2, "gradient_accumulation_steps": 3, **train},
        "deepspeed": {"stage": stage, "offload_optimizer": offload(opt), "offload_param": offload(param)},
    }
    return config_from_dict(raw, check_paths=False)


@pytest.mark.parametrize("stage,opt,param", COMBOS)
def test_every_combination_is_concrete_and_valid(stage, opt, param):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = make_cfg(stage, opt, param)
    ds = build_deepspeed_config(cfg, BatchLayout.from_config(cfg.train, world_size=4))
    assert '"auto"' not in json.dumps(ds)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        2,
        3,
        24,
    )
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert zero.get("offload_optimizer", {}).get("device", "none") == opt
    assert zero.get("offload_param", {}).get("device", "none") == param
    for section in ("offload_optimizer", "offload_param"):
        if zero.get(section, {}).get("device") == "nvme":
            assert zero[section]["nvme_path"] == "/local_nvme"
    # DeepSpeed's own parser (which sees one rank without a process group) accepts it and reads the same numbers.
    parsed = DeepSpeedConfig(build_deepspeed_config(cfg, BatchLayout.from_config(cfg.train, world_size=1)))
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_batch_size == 6
    assert parsed.gradient_clipping == cfg.train.max_grad_norm


def test_precision_clipping_and_optimizer_sections():
    cfg = make_cfg(3, "cpu", "cpu", precision="bf16", max_grad_norm=0.5, optimizer="adamw_deepspeed", lr=3e-4)
    ds = build_deepspeed_config(cfg, BatchLayout.from_config(cfg.train, world_size=1))
    assert ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 3e-4
    fp32 = make_cfg(3, "none", "none", precision="fp32")
    ds = build_deepspeed_config(fp32, BatchLayout.from_config(fp32.train, world_size=1))
    assert ds["bf16"] == {"enabled": False} and "optimizer" not in ds
