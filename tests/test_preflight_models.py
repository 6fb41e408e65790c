"""What `dtrain check` says about a model before any rank starts: a model the run cannot size is a one-line error."""

from __future__ import annotations

import json
import shutil

from tests.helpers import run_dtrain, write_config


def _tiny_moe(tiny_model, folder):
    """The tiny model's tokenizer beside a DeepSeek-V3-shaped config.json (check reads files, no weights): a family
    dtrain counts on the meta device but has no memory formulas for."""
    from transformers import DeepseekV3Config

    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = DeepseekV3Config(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=512)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


def test_nvme_parameter_offload_of_a_model_without_a_shape_is_refused_before_launch(tmp_path, tiny_model):
    model = _tiny_moe(tiny_model, tmp_path / "moe")
    config = write_config(tmp_path / "cfg.yaml", tiny_model, **{"model.path": str(model)})
    nvme = ("deepspeed.offload_param.device=nvme", f"deepspeed.offload_param.nvme_path={tmp_path / 'swap'}")
    out = run_dtrain("check", str(config), *nvme, "--nproc", "2", check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "deepspeed.offload_param.device: nvme sizes its swap buffers from the model's shape" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr
