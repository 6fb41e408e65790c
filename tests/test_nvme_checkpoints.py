"""A checkpoint of a run with optimizer states on NVMe keeps its fp32 weights and moments as DeepSpeed swap files
(ds/offloaded_tensors/): it resumes on the number of ranks it was saved on (tests/test_nvme_optimizer.py), while
export and a resume on another number of ranks, which would read empty placeholders, refuse it in one line."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import yaml

from dtrain.checkpoint_layout import STATE_FILE, Progress
from dtrain.config import ConfigError, dump_yaml, load_config
from dtrain.fingerprint import run_fingerprints
from dtrain.resume import plan_resume
from tests.helpers import run_dtrain, write_config


@pytest.fixture
def nvme_checkpoint(tmp_path, tiny_model):
    """(config resuming it, a checkpoint folder of an NVMe-optimizer run saved on 2 ranks): metadata and the swap
    folder only, which is all the refusals look at."""
    nvme = ["deepspeed.offload_optimizer.device=nvme", f"deepspeed.offload_optimizer.nvme_path={tmp_path / 'nvme'}"]
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_model), nvme)
    checkpoint = cfg.checkpoint_dir / "step-00000002"
    (checkpoint / "ds" / "offloaded_tensors" / "rank00").mkdir(parents=True)
    (checkpoint / "config.yaml").write_text(dump_yaml(cfg))
    progress = Progress(step=2, samples_seen=16, global_batch_size=8, world_size=2)
    state = {"progress": asdict(progress), "format": 2, "fingerprints": run_fingerprints(cfg)}
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    return load_config(tmp_path / "cfg.yaml", [*nvme, f"checkpoint.resume={checkpoint}"]), checkpoint


def test_export_refuses_swapped_optimizer_states_in_one_line(nvme_checkpoint, tmp_path):
    _, checkpoint = nvme_checkpoint
    proc = run_dtrain("export", str(checkpoint), "--hf", str(tmp_path / "hf"), in_process=True, check=False)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "NVMe swap files" in line and "resume it on the number of ranks it was saved on" in line, line
    assert not (tmp_path / "hf").exists()


def test_resume_on_another_world_size_refuses_swapped_optimizer_states(nvme_checkpoint):
    cfg, checkpoint = nvme_checkpoint
    assert not plan_resume(cfg, 2).universal  # the world size it was saved on: DeepSpeed's own load, no conversion
    with pytest.raises(ConfigError, match="saved on 2 ranks, resumed on 1: .* NVMe swap files"):
        plan_resume(cfg, 1)


def test_a_checkpoint_from_before_optimizer_states_existed_resumes(nvme_checkpoint):
    """Its config.yaml lacks train.optimizer_states: it trained with fp32 states, the default, so it is the same run."""
    cfg, checkpoint = nvme_checkpoint
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
    del saved["train"]["optimizer_states"]
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(saved))
    assert plan_resume(cfg, 2).checkpoint == checkpoint
