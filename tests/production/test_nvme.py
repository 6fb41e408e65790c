"""NVMe offload of parameters (the "NVMe" is a tmp dir) on 2 gloo ranks, bf16, CPU Adam. Optimizer states on NVMe are
tested in tests/test_nvme_optimizer.py (training and resume, bitwise against CPU offload) and
tests/test_nvme_checkpoints.py (export refuses their swap files).

The swap buffers: DeepSpeed's parameter swapper asserts that a rank's partition of a parameter fits one buffer
(buffer_size, default 1e8 elements; Llama-3-70B's embedding is 1.05e9). The old config, i.e. that default scaled to
this model the way 1e8 relates to 70B's embedding, trips the assert while the model loads; the generated one loads.
"""

from __future__ import annotations

import json

import pytest
import torch

from dtrain.checkpoint import complete_checkpoints
from dtrain.ds_config import param_swap_buffer_elements
from dtrain.metrics import read_metrics
from tests.production.runs import OLD_BUFFER_SIZE, STEPS
from tests.production.test_full_bf16 import RESUME_RTOL, relative_gaps

pytestmark = [pytest.mark.slow, pytest.mark.long]  # minutes of bf16 / CPU-Adam / NVMe runs: make test-all


def test_generated_swap_buffers_fit_where_the_scaled_default_trips_the_assert(runs):
    old = json.loads((runs.out("swap-old") / "load.json").read_text())
    new = json.loads((runs.out("swap-new") / "load.json").read_text())
    assert old["buffer_size"] == OLD_BUFFER_SIZE and not old["ok"]
    assert f"than buffer size {OLD_BUFFER_SIZE}" in old["error"], old["error"]
    assert new["ok"], new["error"]
    assert new["buffer_size"] == param_swap_buffer_elements(8192 * 128, 2) == 8192 * 128 // 2


def test_parameters_really_go_to_nvme(runs):
    swapped = [p.name for p in runs.nvme.rglob("*.tensor.swp")]
    assert len(swapped) == 4, swapped  # embedding and lm_head, one half per rank; smaller tensors stay in RAM


def test_nvme_offload_trains_and_resumes_like_cpu_offload(runs):
    """Where the weights live must not change the arithmetic: the NVMe run's losses equal the CPU-offload run's
    bit for bit, and a resume from its step-2 checkpoint continues like the uninterrupted run within the CPU-Adam
    resume tolerance."""
    cpu, nvme = read_metrics(runs.run("full-cpu")), read_metrics(runs.run("full-nvme"))
    assert sorted(nvme) == list(range(1, STEPS + 1))
    assert [nvme[s] for s in sorted(nvme)] == [cpu[s] for s in sorted(cpu)]
    resumed = read_metrics(runs.run("nvme-resume"))
    assert sorted(resumed) == list(range(3, STEPS + 1))
    gaps = relative_gaps(resumed, nvme)
    print(f"NVMe resume from step 2: relative loss gaps {gaps}")
    assert max(gaps.values()) < RESUME_RTOL, gaps
    assert [p.name for p in complete_checkpoints(runs.run("nvme-resume") / "checkpoints")][-1] == f"step-{STEPS:08d}"


def test_nvme_run_exports_the_engines_weights(tmp_path, runs):
    from safetensors.torch import load_file

    from tests.helpers import run_dtrain

    run_dtrain("export", str(runs.run("full-nvme")), "--hf", str(tmp_path / "hf"), "--dtype", "bf16")
    exported = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    engine = torch.load(runs.out("full-nvme") / "weights.pt")
    assert engine.keys() == exported.keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in engine.items())
