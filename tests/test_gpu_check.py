"""The CPU-checkable parts of bench/gpu_check.py: its cases are `dtrain train` commands that `dtrain check` accepts
(the GPU runs the trainer itself, nothing built on the side), each case has a plan, the FLOP count of a frozen base,
and the verdicts. The GPU runs need a CUDA machine."""

from __future__ import annotations

import json
import shutil

import pytest

from bench import gpu_check
from tests.helpers import run_dtrain


def test_arguments_and_budget():
    args = gpu_check.parse_args([])
    assert (args.steps, args.seq_len, args.tolerance, args.skip_tests) == (10, 2048, 0.15, False)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "2"])
    # packed-attention check + training cases + the CUDA tests: within the 6 minutes a lent GPU gives the script
    cases = sum(case.budget_s for case in gpu_check.cases(2048, 10))
    assert gpu_check.PACKED_BUDGET_S + cases + gpu_check.CUDA_TESTS_BUDGET_S <= 6 * 60


def _case_model(case, tiny_model, folder):
    if case.shape is None:
        return tiny_model
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    (folder / "config.json").write_text(json.dumps(case.shape))
    return folder


@pytest.mark.parametrize("index", range(4))
def test_each_case_is_a_run_dtrain_check_accepts_with_a_plan(tmp_path, tiny_model, index):
    case = gpu_check.cases(seq_len=2048, steps=12)[index]
    model = _case_model(case, tiny_model, tmp_path / "model")
    overrides = gpu_check.case_overrides(case, model, tmp_path / "run")
    run_dtrain("check", case.config, *overrides, "--nproc", str(case.nproc), in_process=True)  # exit 0
    cfg, shape = gpu_check.load_case(case, model, tmp_path / "run")
    assert cfg.train.precision == "bf16" and cfg.data.packing and cfg.data.seq_len == (2048 if case.shape else 256)
    planned = gpu_check.planned_gpu_bytes(cfg, shape, 80 * 2**30, 512 * 2**30, case.nproc)
    assert 0 < planned < 80 * 2**30


def test_a_frozen_base_counts_four_flops_per_parameter_and_token(tmp_path, tiny_model):
    qlora = next(case for case in gpu_check.cases(2048, 12) if "QLoRA" in case.name)
    cfg, shape = gpu_check.load_case(qlora, _case_model(qlora, tiny_model, tmp_path / "m"), tmp_path / "run")
    trained = gpu_check.trained_params(cfg)
    attention = 6 * shape.num_layers * 2048 * shape.num_heads * shape.head_dim
    assert 0 < trained < shape.total_params / 100
    assert gpu_check.model_flops_per_token(shape, 2048, trained) == 4 * shape.total_params + 2 * trained + attention
    assert gpu_check.model_flops_per_token(shape, 2048) == 6 * shape.total_params + attention


def test_a_gap_over_the_tolerance_or_a_failed_check_fails_the_row():
    rows = [{"case": "a", "measured": 10e9, "planned": 9e9, "tokens_per_s": 1000.0, "mfu": 0.4, "seconds": 50,
             "budget_s": 75},
            {"case": "b", "measured": 12e9, "planned": 9e9, "tokens_per_s": 1000.0, "mfu": 0.4, "seconds": 50,
             "budget_s": 75},
            {"case": "c", "verdict": "FAILED: documents not kept apart", "seconds": 9, "budget_s": 60}]  # fmt: skip
    table = gpu_check.render(rows, 0.15).splitlines()
    assert table[1].endswith("ok") and "OFF BY > 15%" in table[2] and "FAILED" in table[3]
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
