"""Optimizer states on NVMe (the "NVMe" is a tmp dir) train and resume exactly like optimizer states in CPU RAM.

DeepSpeed 0.19.8 read each rank's swapped-out gradient of a large parameter back into a slice of a locked buffer off
a 512-byte boundary (the O_DIRECT read failed unchecked and Adam stepped on stale data), and a resume dropped the
Adam moments of swapped sub-groups (dtrain.nvme_optimizer, docs/nvme-optimizer.md). On 2 ranks the tiny model's
lm_head partition starts 256 bytes past a boundary; on 1 rank every offset happens to be aligned, so the first bug
needs 2 ranks to show.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dtrain.ops import op_status
from tests.helpers import REPO

pytestmark = [
    pytest.mark.slow,  # three 2-rank launches
    pytest.mark.long,  # ~200 s, most of it compiling async_io, pin_memory and CPU Adam: make test-all builds them
    pytest.mark.skipif(not op_status("async_io").compatible, reason="async_io cannot be built here (libaio-dev)"),
]


def probe(out, optimizer: str, nvme, *args: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tests.nvme_probe", str(out), "--optimizer", optimizer, "--nvme", str(nvme), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def test_nvme_optimizer_trains_and_resumes_bitwise_like_cpu_offload(tmp_path):
    """With torch AdamW, on both ranks: the gradient Adam sees, both moments and the fp32 master weights of each of
    3 steps, and the losses, of an NVMe run stopped after step 1 and resumed from its checkpoint, equal those of an
    uninterrupted CPU-offload run."""
    cpu = probe(tmp_path / "cpu", "cpu", tmp_path / "unused", "--steps", "3")
    first = probe(tmp_path / "first", "nvme", tmp_path / "swap", "--steps", "1", "--save", str(tmp_path / "ckpt"))
    assert any((tmp_path / "swap").rglob("*_gradient_*.tensor.swp")), "no gradient went to the NVMe folder"
    assert any((tmp_path / "ckpt").rglob("offloaded_tensors/*/exp_avg-*.tensor.swp")), "no moments in the checkpoint"
    rest = probe(tmp_path / "rest", "nvme", tmp_path / "swap2", "--steps", "3", "--load", str(tmp_path / "ckpt"))
    for rank in range(2):
        nvme_losses = first[rank]["losses"] + rest[rank]["losses"]
        assert nvme_losses == cpu[rank]["losses"], rank
        nvme_steps = {**first[rank]["steps"], **rest[rank]["steps"]}
        assert nvme_steps.keys() == cpu[rank]["steps"].keys()
        for key, expected in cpu[rank]["steps"].items():
            for name, tensor in expected.items():
                assert torch.equal(nvme_steps[key][name], tensor), f"rank {rank} step {key[0]} {name} differs"
