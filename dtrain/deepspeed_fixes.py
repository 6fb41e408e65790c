"""Fixes dtrain applies to DeepSpeed, each for a defect measured at our version, in one place.

Each fix is guarded (the signature it repairs, or the DeepSpeed versions measured) and leaves a fixed DeepSpeed alone.
`before_init` runs once per rank right before `deepspeed.init_distributed`, `apply` right after it
(dist.compute_init). The write-ups, ready to
file upstream, are in docs/deepspeed-fixes.md (the NVMe optimizer's, in dtrain/nvme_optimizer.py, in
docs/nvme-optimizer.md); each has a test that fails without the fix.
"""

from __future__ import annotations

import inspect
import math
import os
from datetime import timedelta

import torch
from packaging.version import Version


def before_init() -> None:
    skip_inference_shm_op()


def skip_inference_shm_op() -> None:
    """A CPU rank does not compile DeepSpeed's shm_comm op.

    DeepSpeed 0.19's `TorchBackend.__init__` (deepspeed/comm/torch.py, `build_shm_op`) JIT-compiles it on every
    CPU process group start (~60 s on 2 idle cores, ~3 min on a loaded one: most of a fresh machine's wait for the
    demo's first step), but only `inference_all_reduce` (AutoTP inference layers) uses it; training's collectives
    are torch.distributed's. Marking it incompatible is DeepSpeed's own switch for "not here"."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def apply(timeout: timedelta) -> None:
    from dtrain.nvme_optimizer import read_swapped_gradients_whole

    groups_inherit_timeout(timeout)
    universal_load_reads_own_share()
    read_swapped_gradients_whole()  # NVMe optimizer offload otherwise steps on stale gradients (its module says why)


def groups_inherit_timeout(timeout: timedelta) -> None:
    """Every process group DeepSpeed creates gets the run's collective timeout.

    DeepSpeed 0.19 makes its groups through `TorchBackend.new_group(ranks)` (deepspeed/comm/torch.py), which calls
    `torch.distributed.new_group(ranks)` without a timeout; torch then uses its default (10 min for NCCL), not the
    world group's. One of them, the clone of the world group (utils/groups.py `_clone_world_group`), is ZeRO's
    data-parallel group: the gradient reduce-scatter and grad-norm all-reduce of a step behind a slow rank 0 would
    die at 10 min whatever deepspeed.timeout_minutes says."""
    from deepspeed.comm import comm  # the module holding the backend object, not the package's copy of it

    backend = comm.cdb
    if backend is None or "timeout" in inspect.signature(backend.new_group).parameters:  # None: no process group
        return

    def new_group(ranks):
        return torch.distributed.new_group(ranks, timeout=timeout)

    backend.new_group = new_group


def universal_load_reads_own_share() -> None:
    """ZeRO-3's universal load reads only this rank's slice of each saved tensor.

    DeepSpeed 0.19's `DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state` (runtime/zero/stage3.py) `torch.load`s
    each parameter's whole fp32 / exp_avg / exp_avg_sq file, pads it with `torch.cat` (a full copy) and keeps
    1/N of it: every rank reads the whole checkpoint (~840 GB per rank for a 70B model, x32 ranks from shared
    storage). Here the file is loaded on the meta device (its pickle only: dtypes, shapes and where each tensor's
    bytes sit) and the slice's bytes are read from there, with readahead off. A memory map is not enough: page-fault
    readahead (8 MB windows here, more on parallel file systems) pulls in most of the file around a slice.
    Tensors this cannot slice alone (AutoEP experts, AutoTP shards) keep DeepSpeed's own path."""
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.checkpoint.constants import EP_IS_EXPERT_PARAM, PARAM
    from deepspeed.checkpoint.universal_checkpoint import _get_param_uc_restore_meta
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    deepspeeds = Stage3.load_hp_checkpoint_state
    if getattr(deepspeeds, "dtrain_fix", False) or Version(deepspeed.__version__) >= Version("0.20"):
        return

    def load_hp_checkpoint_state(self, folder, key, param=None):
        with open(os.path.join(folder, f"{key}.pt"), "rb", buffering=0) as file:
            saved = torch.load(unread_ahead(file), weights_only=False, map_location="meta")
            if isinstance(saved, dict):
                if saved.get(EP_IS_EXPERT_PARAM, False) or (param is not None and _get_param_uc_restore_meta(param)):
                    return deepspeeds(self, folder, key, param)
                saved = saved[PARAM]
            if not saved.is_contiguous():
                return deepspeeds(self, folder, key, param)
            group = self._get_param_partition_group(param) if param is not None else self.dp_process_group
            share = math.ceil(saved.numel() / dist.get_world_size(group=group))
            start = min(dist.get_rank(group=group) * share, saved.numel())
            partition = torch.zeros(share, dtype=saved.dtype)  # the zero padding DeepSpeed gives the last rank
            read_elements(file, saved, start, partition[: min(share, saved.numel() - start)])
            return partition

    load_hp_checkpoint_state.dtrain_fix = True
    load_hp_checkpoint_state.__wrapped__ = deepspeeds  # bench/universal_resume_io.py measures both
    Stage3.load_hp_checkpoint_state = load_hp_checkpoint_state


def unread_ahead(file):
    """`file` with the kernel's readahead off: reading the pickle at a file's start would otherwise pull in (and
    mark for further readahead) megabytes of tensor data another rank owns."""
    os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
    return file


def read_elements(file, saved: torch.Tensor, start: int, out: torch.Tensor) -> None:
    """Fill `out` with elements `start`.. of `saved`, a contiguous tensor of the torch.save `file` loaded with
    map_location="meta" (which records each storage's byte offset in the file): those bytes only."""
    if out.numel() == 0:
        return
    first = saved.untyped_storage()._checkpoint_offset + (saved.storage_offset() + start) * saved.element_size()
    buffer = memoryview(out.view(torch.uint8).numpy())
    file.seek(first)
    done = 0
    while done < len(buffer):
        read = file.readinto(buffer[done:])
        if not read:
            raise EOFError(f"{file.name}: ends before the {out.numel()} elements at {start}")
        done += read
