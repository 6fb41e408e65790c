"""The generated DeepSpeed config: concrete numbers for every stage/offload combination, accepted by DeepSpeed."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import pytest

from dtrain.config import ConfigError, config_from_dict, zero_layout_problems
from dtrain.config.deepspeed import OFFLOAD_DEVICES, ZERO_STAGES, precision_stage_problems
from dtrain.ds_config import (
    AIO,
    PARAM_SWAP_BUFFERS,
    build_deepspeed_config,
    largest_parameter,
    param_swap_buffer_elements,
    pin_memory,
)
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
        # bf16 at stage 0 is refused by the config (no fp32 master weights, bf16 accumulation)
        "train": {
            "max_steps": 10,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 3,
            "precision": "bf16" if stage else "fp32",
            **train,
        },  # fmt: skip
        "deepspeed": {"stage": stage, "offload_optimizer": offload(opt), "offload_param": offload(param)},
    }
    return config_from_dict(raw, check_paths=False)


@pytest.mark.parametrize("stage,opt,param", COMBOS)
def test_every_combination_is_concrete_and_valid(stage, opt, param):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = make_cfg(stage, opt, param)
    ds = build_deepspeed_config(cfg, BatchLayout.from_config(cfg.train, world_size=4), largest_param=10**6)
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
    parsed = DeepSpeedConfig(
        build_deepspeed_config(cfg, BatchLayout.from_config(cfg.train, world_size=1), largest_param=10**6)
    )
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


def test_bf16_accumulates_in_fp32_at_every_stage_that_allows_it():
    for stage in (1, 2, 3):
        cfg = make_cfg(stage, "none", "none", precision="bf16")
        ds = build_deepspeed_config(cfg, BatchLayout.from_config(cfg.train, world_size=2))
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = make_cfg(3, "none", "none", precision="fp32")
    assert "data_types" not in build_deepspeed_config(fp32, BatchLayout.from_config(fp32.train, world_size=2))
    assert precision_stage_problems("bf16", 0) and not precision_stage_problems("bf16", 1)
    assert not precision_stage_problems("fp32", 0)


LLAMA3_70B_EMBEDDING = 128_256 * 8192  # 1.05e9 elements


@pytest.mark.parametrize("world_size", [1, 8, 10, 11, 64])
def test_nvme_parameter_buffers_hold_the_largest_partition(world_size):
    cfg = make_cfg(3, "cpu", "nvme", precision="bf16")
    layout = BatchLayout.from_config(cfg.train, world_size=world_size)
    ds = build_deepspeed_config(cfg, layout, largest_param=LLAMA3_70B_EMBEDDING)
    param = ds["zero_optimization"]["offload_param"]
    partition = -(-LLAMA3_70B_EMBEDDING // world_size)
    assert partition <= param["buffer_size"] < partition + 512 and param["buffer_size"] % 512 == 0
    assert param["buffer_count"] == PARAM_SWAP_BUFFERS
    assert ds["aio"] == AIO
    if world_size < 11:  # DeepSpeed's default (1e8 elements) would fail the swapper's assert on this many ranks
        assert param["buffer_size"] > 100_000_000


def test_nvme_buffers_read_the_model_shape_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 128,
                "vocab_size": 1000,
            }
        )  # fmt: skip
    )
    assert largest_parameter(str(tmp_path)) == 64_000
    assert param_swap_buffer_elements(64_000, 2) == 32_256  # 32,000 rounded up to the 512-element aio alignment


def test_pin_memory_defaults_to_the_accelerator_unless_set():
    off = make_cfg(3, "cpu", "cpu").deepspeed.offload_param
    unset = dataclasses.replace(off, pin_memory=None)
    assert pin_memory(unset, "cuda") is True and pin_memory(unset, "cpu") is False
    for configured in (True, False):
        pinned = dataclasses.replace(off, pin_memory=configured)
        assert pin_memory(pinned, "cuda") is configured and pin_memory(pinned, "cpu") is configured


def test_ops_a_run_needs():
    from dtrain.ops import needed_ops

    deepspeed_adam = make_cfg(3, "cpu", "cpu", optimizer="adamw_deepspeed")
    assert needed_ops(deepspeed_adam, "cpu") == ["cpu_adam"]
    assert needed_ops(deepspeed_adam, "cuda") == ["cpu_adam"]
    assert needed_ops(make_cfg(3, "none", "none", optimizer="adamw_deepspeed"), "cuda") == ["fused_adam"]
    assert needed_ops(make_cfg(3, "cpu", "nvme"), "cuda") == ["pin_memory", "async_io"]
    assert needed_ops(make_cfg(2, "none", "none"), "cuda") == []


def test_check_warns_for_torch_adamw_under_optimizer_offload():
    from dtrain_launch.validate import launch_warnings

    (torch_adam,) = launch_warnings(make_cfg(3, "cpu", "cpu", optimizer="adamw_torch"))
    assert "torch AdamW is 2.2x slower than DeepSpeed's CPU Adam" in torch_adam and "adamw_deepspeed" in torch_adam
    assert launch_warnings(make_cfg(3, "cpu", "cpu", optimizer="adamw_deepspeed")) == []
    assert launch_warnings(make_cfg(3, "none", "none", optimizer="adamw_torch")) == []


def test_optimizer_states_on_nvme_get_the_aio_section():
    """DeepSpeed's optimizer swapper reads the same aio settings as the parameter swapper; they are written out."""
    cfg = make_cfg(3, "nvme", "cpu", optimizer="adamw_deepspeed")
    ds = build_deepspeed_config(cfg, BatchLayout.from_config(cfg.train, world_size=2), largest_param=10**6)
    assert ds["aio"] == AIO and ds["zero_optimization"]["offload_optimizer"]["nvme_path"] == "/local_nvme"


def test_check_reports_each_op_a_run_loads():
    from dtrain_launch.validate import ops_report

    *lines, machine = ops_report(make_cfg(3, "cpu", "cpu", optimizer="adamw_deepspeed"), "cpu")
    assert [line.split(":")[0] for line in lines] == ["cpu_adam (cpu ranks)"]
    assert all(line.endswith(": built for this machine type") or "NOT built" in line for line in lines), lines
    assert machine.startswith("this machine type: ")


def test_check_names_the_lock_file_a_killed_op_build_left(tmp_path, monkeypatch):
    """torch waits forever on a build's `lock` file; one left by a killed build hangs every run: check names it."""
    from dtrain_launch.validate import ops_report

    from dtrain.ops import _builder

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there
    lock = tmp_path / _builder("cpu_adam").NAME / "lock"
    lock.parent.mkdir()
    lock.touch()
    report = ops_report(make_cfg(3, "cpu", "cpu", optimizer="adamw_deepspeed"), "cpu")
    lines = dict(line.split(": ", 1) for line in report[:-1])
    assert (
        f"NOT built, and {lock} exists" in lines["cpu_adam (cpu ranks)"]
        and "delete it" in lines["cpu_adam (cpu ranks)"]
    )


def test_bf16_optimizer_states_are_deepspeeds_bf16_master_and_states():
    cfg = make_cfg(3, "cpu", "cpu", optimizer="adamw_deepspeed", optimizer_states="bf16")
    ds = build_deepspeed_config(cfg, BatchLayout.from_config(cfg.train, world_size=2), largest_param=10**6)
    assert ds["bf16"] == {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    assert build_deepspeed_config(make_cfg(3, "cpu", "cpu"), BatchLayout.from_config(cfg.train, 2))["bf16"] == {
        "enabled": True
    }


@pytest.mark.parametrize(
    "train,opt,missing",
    [
        ({"optimizer": "adamw_torch"}, "cpu", "train.optimizer adamw_deepspeed (got adamw_torch)"),
        ({"optimizer": "adamw_deepspeed"}, "none", "deepspeed.offload_optimizer.device cpu (got none)"),
        ({"optimizer": "adamw_deepspeed"}, "nvme", "deepspeed.offload_optimizer.device cpu (got nvme)"),
    ],
)
def test_bf16_optimizer_states_need_an_offloaded_deepspeed_adam(train, opt, missing):
    with pytest.raises(ConfigError, match=re.escape(f"train.optimizer_states: bf16 needs {missing}")):
        make_cfg(3, opt, "none", optimizer_states="bf16", **train)


def test_plan_counts_bf16_optimizer_states_at_half_the_offloaded_bytes():
    from dtrain.plan.memory import ZeroChoice, model_states
    from dtrain.plan.shape import ParamCounts

    counts = ParamCounts(trainable=10**9, frozen=0, largest_layer=10**6)
    zero = ZeroChoice(3, "nvme", "cpu")  # the planner's arithmetic; the config allows bf16 states on cpu only
    fp32, bf16 = (
        model_states(counts, zero, 1, 8, optimizer="adamw_deepspeed", optimizer_states=s) for s in ("fp32", "bf16")
    )
    assert bf16.nvme.optimizer == fp32.nvme.optimizer / 2 == 6 * 10**9  # 2 B master + 4 B moments per parameter
    assert bf16.nvme.grads == fp32.nvme.grads / 2
