"""A model family plan has no formulas for: parameters counted on the meta device, memory reported as not estimated,
and the fit check that check / submit run never refuses the run for it. Cost ~2 s, no training."""

from __future__ import annotations

from dtrain.config import config_from_dict
from dtrain.layout import BatchLayout
from dtrain.plan.hardware import Hardware
from dtrain.plan.report import plan_command
from dtrain.units import parse_size


def test_unknown_family_is_counted_not_blocked(tmp_path):
    from dtrain_launch.validate import fit_report
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=128))
    model.save_pretrained(tmp_path / "gpt2")
    total = sum(p.numel() for p in model.parameters())
    raw = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tmp_path / "gpt2")},
        "strategy": "lora",
        "lora": {"r": 4, "target_modules": ["c_attn"]},
        "data": {"datasets": [{"path": "data/sample/text.jsonl"}]},
        "train": {"max_steps": 1, "gradient_accumulation_steps": 1},
    }
    cfg = config_from_dict(raw, check_paths=False)
    trainable = 2 * 4 * (64 + 3 * 64)  # c_attn: 64 -> 192 in each of 2 layers, rank 4
    text = plan_command(cfg, 1, 1, parse_size("80GB"), parse_size("256GB"))
    assert "not estimated: model_type 'gpt2'" in text
    assert f"counted on the meta device: {total:,} parameters, {trainable:,} trainable with lora" in text
    fit = fit_report(cfg, BatchLayout.from_config(cfg.train, 1), Hardware(1, 1, 80 * 10**9, 256 * 10**9, None))
    assert len(fit) == 1 and fit[0].startswith("not estimated (model_type 'gpt2'")
