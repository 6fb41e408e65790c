"""Optimizer states on NVMe (`offload_optimizer.device: nvme`): two fixes of DeepSpeed 0.19, docs/nvme-optimizer.md.

1. The swapped-out gradients are read back whole (`read_swapped_gradients_whole`). ZeRO-3 writes each rank's fp32
gradient of a parameter above 1 MiB to its own swap file and, at the step, reads it back into a slice of a
page-locked buffer at the parameter's offset in the flat partition
(`PartitionedOptimizerSwapper._swap_in_pinned_gradients`). The aio op reads with O_DIRECT, which needs a memory
address on a 512-byte boundary. Since DeepSpeed PR #8212 (0.19.x) a slice of a locked buffer counts as locked
(`deepspeed_pin_tensor_t::is_managed` checks ranges), so the op reads straight into the slice instead of through
its own aligned bounce buffer; at an offset off the boundary the kernel rejects the read, DeepSpeed does not check
the completion's result, and the optimizer steps on whatever the buffer held before. The loss leaves a CPU-offload
run's from the second step.

The fix here reads each such gradient into an ordinary tensor (the aio op then bounces through an aligned buffer of
its own) and copies it into place; aligned slices are read directly as before. Upstream, the op should bounce
whenever the address is misaligned.

2. A resume keeps the Adam moments (`restore_swapped_moments`). The ZeRO checkpoint of a swapped sub-group holds
empty placeholders for its moments, the real ones are swap files that `load_checkpoint` copies back into the swap
folder; but after the load the optimizer holds no state for that sub-group, so the swapper registers only the
master weights, Adam starts fresh moments at the next step (exp_avg = (1 - beta1) * grad) and writes them over the
checkpoint's. Giving the optimizer the saved step and placeholders of the right length again makes the next swap-in
read both moments from their files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The DeepSpeed releases this was checked on: 0.19.8 has the bug; PR #8212 landed in 0.19.x. A newer release is left
# alone until tests/test_nvme_optimizer.py has been run against it.
AFFECTED = ("0.19.0", "0.19.8")


def affected(version: str) -> bool:
    from packaging.version import Version

    low, high = (Version(v) for v in AFFECTED)
    return low <= Version(version) <= high


def restore_swapped_moments(engine: Any, checkpoint_tag_dir: Path) -> int:
    """After `engine.load_checkpoint` on affected versions: the saved optimizer state of every swapped sub-group back
    in the optimizer, its emptied tensors as placeholders (never touched, so the pages are not committed) that the
    next swap-in fills from the swap files. Returns the number of sub-groups restored."""
    import deepspeed
    import torch.distributed as dist

    optimizer = engine.optimizer
    if not (getattr(optimizer, "swap_optimizer", False) and affected(deepspeed.__version__)):
        return 0
    rank = dist.get_rank(group=optimizer.dp_process_group)
    (optim_file,) = checkpoint_tag_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    saved = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    saved_state = saved["optimizer_state_dict"]["state"]
    restored = 0
    for sub_group, fp32 in enumerate(optimizer.fp32_partitioned_groups_flat):
        if not optimizer._swappable_optimizer_subgroup(sub_group) or sub_group not in saved_state:
            continue
        numel = int(optimizer.fp16_partitioned_groups_flat_numel[sub_group])
        optimizer.optimizer.state[fp32] = {
            key: torch.empty(numel, dtype=value.dtype) if torch.is_tensor(value) and value.numel() == 0 else value
            for key, value in saved_state[sub_group].items()
        }
        restored += 1
    return restored


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
