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

2. A resume restores the optimizer (`load_swapped_optimizer_state`). `engine.load_checkpoint` skips the ZeRO
optimizer load altogether when the optimizer is on NVMe (engine.py:4456, `not self.zero_nvme_offload_optimizer()`):
it copies the swap files back and refreshes the swapped sub-groups' weights from them, but every step counter, every
Adam moment and the fp32 master of each sub-group small enough to stay in RAM (norms) are left as a fresh run has
them. This loads the ZeRO optimizer state the way the CPU path does, then gives each swapped sub-group its saved
state back with placeholders of the right length for the emptied moments, so the next swap-in registers the moment
files (`_get_state_tensors` only registers tensors of at least 1 MiB) and reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The DeepSpeed releases this was checked on: 0.19.8 has both bugs (PR #8212, behind the first, landed in 0.19.x);
# a newer release is left alone until tests/test_nvme_optimizer.py has been run against it.
AFFECTED = ("0.19.0", "0.19.8")


def affected(version: str) -> bool:
    from packaging.version import Version

    low, high = (Version(v) for v in AFFECTED)
    return low <= Version(version) <= high


def load_swapped_optimizer_state(engine: Any, load_dir: Path, tag: str) -> bool:
    """After `engine.load_checkpoint(load_dir, tag)` on affected versions with the optimizer on NVMe: what that call
    skipped, loaded. True when it ran."""
    import deepspeed

    optimizer = engine.optimizer
    if not (getattr(optimizer, "swap_optimizer", False) and affected(deepspeed.__version__)):
        return False
    optimizer.checkpoint_event_prologue()  # as load_checkpoint brackets its own load: partitioned, then regathered
    if not engine._load_zero_checkpoint(str(load_dir), tag, load_optimizer_states=True):
        raise RuntimeError(f"DeepSpeed found no ZeRO optimizer state in {load_dir / tag}")
    _restore_swapped_moments(optimizer, load_dir / tag)
    optimizer.checkpoint_event_epilogue()
    return True


def _restore_swapped_moments(optimizer: Any, tag_dir: Path) -> None:
    """The rank's saved optimizer state back for every swapped sub-group, its emptied tensors replaced by untouched
    `torch.empty` placeholders (no pages committed) that the next swap-in fills from the moment files."""
    import torch.distributed as dist

    rank = dist.get_rank(group=optimizer.dp_process_group)
    (optim_file,) = tag_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    saved = torch.load(optim_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    saved_state = saved["optimizer_state_dict"]["state"]
    for sub_group, fp32 in enumerate(optimizer.fp32_partitioned_groups_flat):
        if not optimizer._swappable_optimizer_subgroup(sub_group) or sub_group not in saved_state:
            continue
        numel = int(optimizer.fp16_partitioned_groups_flat_numel[sub_group])
        optimizer.optimizer.state[fp32] = {
            key: torch.empty(numel, dtype=value.dtype) if torch.is_tensor(value) and value.numel() == 0 else value
            for key, value in saved_state[sub_group].items()
        }


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
