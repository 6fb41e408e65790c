"""NVMe offload of parameters and optimizer states (the "NVMe" is a tmp dir) on 2 gloo ranks, bf16, CPU Adam.

The swap buffers: DeepSpeed's parameter swapper asserts that a rank's partition of a parameter fits one buffer
(buffer_size, default 1e8 elements; Llama-3-70B's embedding is 1.05e9). The old config, i.e. that default scaled to
this model the way 1e8 relates to 70B's embedding, trips the assert while the model loads; the generated one loads.
"""

from __future__ import annotations

import json
import shutil

import pytest

from dtrain.checkpoint import complete_checkpoints
from dtrain.ds_config import param_swap_buffer_elements
from dtrain.metrics import read_metrics
from tests.production.runs import OLD_BUFFER_SIZE, STEPS
from tests.production.test_full_bf16 import RESUME_RTOL, relative_gaps

pytestmark = pytest.mark.slow


def test_generated_swap_buffers_fit_where_the_scaled_default_trips_the_assert(runs):
    old = json.loads((runs.out("swap-old") / "load.json").read_text())
    new = json.loads((runs.out("swap-new") / "load.json").read_text())
    assert old["buffer_size"] == OLD_BUFFER_SIZE and not old["ok"]
    assert f"than buffer size {OLD_BUFFER_SIZE}" in old["error"], old["error"]
    assert new["ok"], new["error"]
    assert new["buffer_size"] == param_swap_buffer_elements(8192 * 128, 2) == 8192 * 128 // 2


def test_parameters_and_optimizer_states_really_go_to_nvme(runs):
    swapped = [p for p in (runs.nvme / "param").rglob("*") if p.is_file()]
    assert swapped, "no parameter reached the NVMe folder"
    ckpt = runs.checkpoint("full-nvme", STEPS) / "ds" / "offloaded_tensors"
    assert sorted(p.name for p in ckpt.iterdir()) == ["rank0", "rank1"]
    assert all(any(rank.iterdir()) for rank in ckpt.iterdir())


def test_nvme_offload_trains_and_resumes_like_cpu_offload(runs):
    """Where the states live must not change the arithmetic: the NVMe run's losses equal the CPU-offload run's, and
    a resume from its step-2 checkpoint continues like the uninterrupted run within the CPU-Adam resume tolerance."""
    cpu, nvme = read_metrics(runs.run("full-cpu")), read_metrics(runs.run("full-nvme"))
    assert sorted(nvme) == list(range(1, STEPS + 1))
    assert [nvme[s] for s in sorted(nvme)] == [cpu[s] for s in sorted(cpu)]
    resumed = read_metrics(runs.run("nvme-resume"))
    assert sorted(resumed) == list(range(3, STEPS + 1))
    gaps = relative_gaps(resumed, nvme)
    print(f"NVMe resume from step 2: relative loss gaps {gaps}")
    assert max(gaps.values()) < RESUME_RTOL, gaps
    assert [p.name for p in complete_checkpoints(runs.run("nvme-resume") / "checkpoints")][-1] == f"step-{STEPS:08d}"


def test_nvme_optimizer_checkpoints_are_refused_by_export_and_resharding(tmp_path, runs):
    """DeepSpeed saves empty placeholders for the fp32 weights and moments in its ZeRO files and the real states in
    its swap format under offloaded_tensors/: export and the universal conversion would read the placeholders, so
    both refuse, and `dtrain check` says so before the run starts."""
    from tests.helpers import run_dtrain

    refused = run_dtrain("export", str(runs.run("full-nvme")), "--hf", str(tmp_path / "hf"), check=False)
    assert refused.returncode != 0 and "NVMe swap files" in refused.stderr and not (tmp_path / "hf").exists()
    config = runs.config("nvme-reshard")
    shutil.copytree(runs.checkpoint("full-nvme", 2), config.parent / "run" / "checkpoints" / "step-00000002")
    check = run_dtrain("check", str(config), *runs.nvme_overrides(), "--nproc", "2")
    assert "WARNING      deepspeed.offload_optimizer.device nvme" in check.stdout
    resharded = run_dtrain("check", str(config), *runs.nvme_overrides(), "--nproc", "1", check=False)
    assert resharded.returncode == 2 and "can only be resumed on the same number of ranks" in resharded.stderr
