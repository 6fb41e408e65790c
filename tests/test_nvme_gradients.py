"""Optimizer states on NVMe (the "NVMe" is a tmp dir) train exactly like optimizer states in CPU RAM.

DeepSpeed 0.19.8 read each rank's swapped-out gradient of a large parameter back into a slice of a locked buffer off
a 512-byte boundary; the O_DIRECT read failed unchecked and Adam stepped on stale data (dtrain.nvme_gradients,
docs/nvme-optimizer.md). On 2 ranks the tiny model's lm_head partition starts 256 bytes past a boundary; on 1 rank
every offset happens to be aligned, so the bug needs 2 ranks to show.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dtrain.ops import op_status
from tests.helpers import REPO

pytestmark = [
    pytest.mark.slow,  # two 2-rank launches
    pytest.mark.skipif(not op_status("async_io").compatible, reason="async_io cannot be built here (libaio-dev)"),
]


def probe(out, optimizer: str, nvme) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tests.nvme_probe", str(out), "--optimizer", optimizer, "--nvme", str(nvme), "--steps", "2"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def test_nvme_optimizer_steps_on_the_same_gradients_as_cpu_offload(tmp_path):
    """Bitwise, with torch AdamW: the gradient Adam sees, both moments and the fp32 master weights of both steps on
    both ranks, and the losses."""
    cpu = probe(tmp_path / "cpu", "cpu", tmp_path / "unused")
    nvme = probe(tmp_path / "nvme", "nvme", tmp_path / "swap")
    assert any((tmp_path / "swap").rglob("*_gradient_*.tensor.swp")), "no gradient went to the NVMe folder"
    for rank, (on_cpu, on_nvme) in enumerate(zip(cpu, nvme)):
        assert on_nvme["losses"] == on_cpu["losses"], rank
        assert on_nvme["steps"].keys() == on_cpu["steps"].keys()
        for key, expected in on_cpu["steps"].items():
            for name, tensor in expected.items():
                got = on_nvme["steps"][key][name]
                assert torch.equal(got, tensor), f"rank {rank} step {key[0]} sub-group {key[1]} {name} differs"
