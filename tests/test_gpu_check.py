"""The CPU-checkable parts of bench/gpu_check.py: arguments, the cases' configs and model shapes, the model built on
the meta device (parameter count as the planner counts it), the plan lookup and the verdict. The GPU runs
themselves need a CUDA machine."""

from __future__ import annotations

import pytest

from bench import gpu_check


def test_arguments():
    args = gpu_check.parse_args([])
    assert (args.steps, args.seq_len, args.tolerance, args.skip_tests) == (20, 2048, 0.15, False)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "2"])


@pytest.mark.parametrize("index,params", [(0, 8_030_261_248), (1, 1_235_814_400), (2, 1_235_814_400)])
def test_cases_build_on_meta_and_have_a_plan(tmp_path, index, params):
    case = gpu_check.cases(seq_len=2048, steps=20)[index]
    cfg, shape = gpu_check.load_case(case, tmp_path / "model")
    assert cfg.data.seq_len == 2048 and cfg.train.max_steps == 20 and cfg.train.precision == "bf16"
    from dtrain.strategies.loading import meta_model

    model = meta_model(tmp_path / "model")  # what gpu_check materializes on the GPU
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == shape.total_params == params
    planned = gpu_check.planned_gpu_bytes(cfg, shape, 80 * 2**30, 512 * 2**30)
    assert 2e9 < planned < 80 * 2**30
    assert gpu_check.model_flops_per_token(shape, 2048) > 6 * params


def test_a_gap_over_the_tolerance_fails_the_row():
    rows = [{"case": "a", "measured": 10e9, "planned": 9e9, "tokens_per_s": 1000.0, "mfu": 0.4},
            {"case": "b", "measured": 12e9, "planned": 9e9, "tokens_per_s": 1000.0, "mfu": 0.4}]  # fmt: skip
    table = gpu_check.render(rows, 0.15)
    assert table.splitlines()[1].endswith("ok") and "OFF BY > 15%" in table.splitlines()[2]
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12


@pytest.mark.parametrize("strategy", ["full", "qlora"])
def test_materialize_fills_every_meta_tensor(tmp_path, tiny_model, strategy):
    """On the CPU with the tiny model's shape: random weights everywhere, qlora's decoder linears quantized."""
    import json

    import torch

    from dtrain.strategies.loading import meta_model

    shape = json.loads((tiny_model / "config.json").read_text())
    case = gpu_check.Case("tiny", gpu_check.cases(64, 3)[0 if strategy == "qlora" else 1].config, (), shape)
    cfg, _ = gpu_check.load_case(case, tmp_path / "model")
    model = gpu_check.materialize(meta_model(tmp_path / "model"), cfg, torch.device("cpu"))
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "cpu" for t in tensors)
    linears = [type(m).__name__ for m in model.model.layers[0].self_attn.children()]
    assert linears.count("Linear4bit" if strategy == "qlora" else "Linear") == 4
    assert model.model.rotary_emb.inv_freq.abs().sum() > 0
