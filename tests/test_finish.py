"""export.on_finish: hf for a full run (adapter and merged: tests/test_hub_e2e.py). Uses the shared full reference
run (no extra training when the slow suite runs); the export itself ~5 s."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import consolidated

pytestmark = pytest.mark.slow


def test_hf_on_finish_of_a_full_run_loads_with_the_trained_weights(full_reference, tmp_path):
    from transformers import AutoModelForCausalLM

    from dtrain.checkpoint import complete_checkpoints
    from dtrain.config import load_config
    from dtrain.finish import export_on_finish

    run = full_reference(2)
    cfg = load_config(run.parent / "cfg.yaml", check_paths=False)
    cfg.output_dir, cfg.checkpoint.dir = str(tmp_path), str(run / "checkpoints")  # write beside, not into, the run
    model = AutoModelForCausalLM.from_pretrained(export_on_finish(cfg, "hf"), dtype=torch.float32)
    trained = consolidated(complete_checkpoints(run / "checkpoints")[-1])
    for name, param in model.state_dict().items():
        if name in trained:
            torch.testing.assert_close(param, trained[name].float(), rtol=0, atol=0, msg=name)
