"""Optimizer states on NVMe: the swapped-out gradients are read back whole (DeepSpeed 0.19, docs/nvme-optimizer.md).

Under `offload_optimizer.device: nvme` ZeRO-3 writes each rank's fp32 gradient of a parameter above 1 MiB to its own
swap file and, at the step, reads it back into a slice of a page-locked buffer at the parameter's offset in the flat
partition (`PartitionedOptimizerSwapper._swap_in_pinned_gradients`). The aio op reads with O_DIRECT, which needs a
memory address on a 512-byte boundary. Since DeepSpeed PR #8212 (0.19.x) a slice of a locked buffer counts as locked
(`deepspeed_pin_tensor_t::is_managed` checks ranges), so the op reads straight into the slice instead of through its
own aligned bounce buffer; at an offset off the boundary the kernel rejects the read, DeepSpeed does not check the
completion's result, and the optimizer steps on whatever the buffer held before. The loss leaves a CPU-offload
run's from the second step.

The fix here reads each such gradient into an ordinary tensor (the aio op then bounces through an aligned buffer of
its own) and copies it into place; aligned slices are read directly as before. Upstream, the op should bounce
whenever the address is misaligned (docs/nvme-optimizer.md has the write-up).
"""

from __future__ import annotations

from typing import Any

import torch

# The DeepSpeed releases this was checked on: 0.19.8 has the bug; PR #8212 landed in 0.19.x. A newer release is left
# alone until tests/test_nvme_gradients.py has been run against it.
AFFECTED = ("0.19.0", "0.19.8")


def affected(version: str) -> bool:
    from packaging.version import Version

    low, high = (Version(v) for v in AFFECTED)
    return low <= Version(version) <= high


def read_swapped_gradients_whole() -> bool:
    """Replace `_swap_in_pinned_gradients` on affected DeepSpeed versions; True when it was replaced."""
    import deepspeed
    from deepspeed.runtime.swap_tensor.partitioned_optimizer_swapper import PartitionedOptimizerSwapper

    if not affected(deepspeed.__version__):
        return False
    PartitionedOptimizerSwapper._swap_in_pinned_gradients = _swap_in_pinned_gradients
    return True


def _swap_in_pinned_gradients(self: Any, aio_handle: Any, parameter: Any, gradient_tensor: torch.Tensor) -> None:
    """DeepSpeed 0.19.8's method, with misaligned destinations read through a staging tensor: one at a time, so the
    extra memory is the largest such gradient (twice: staging and the op's bounce buffer)."""
    from deepspeed.runtime.swap_tensor.optimizer_utils import OptimizerSwapper
    from deepspeed.runtime.swap_tensor.utils import swap_in_tensors

    swap_info = self.swap_params_info[OptimizerSwapper.parameter_id(parameter)]
    alignment = aio_handle.get_alignment()
    aligned, misaligned = [], []
    for grad in swap_info.swapped_gradients.values():
        destination = gradient_tensor.narrow(0, grad.offset, grad.length)
        (aligned if destination.data_ptr() % alignment == 0 else misaligned).append((destination, grad.path))
    if aligned:
        swap_in_tensors(aio_handle, [d for d, _ in aligned], [p for _, p in aligned])
        assert aio_handle.wait() == len(aligned)
    for destination, path in misaligned:
        staging = torch.empty_like(destination)
        swap_in_tensors(aio_handle, [staging], [path])
        assert aio_handle.wait() == 1
        destination.copy_(staging)
