"""Reading torch files from a checkpoint without letting them run code.

A checkpoint folder may come from someone else. `torch.load(weights_only=False)` unpickles arbitrary objects, so a
crafted file runs code on the machine that reads it. Everything dtrain reads outside DeepSpeed's own resume (export,
plan, check, status) goes through here: torch's weights-only unpickler, allowing the three plain DeepSpeed types
its ZeRO files hold (the stage enum, the loss scaler, ZeRO-1/2's fragment addresses). DeepSpeed's `load_checkpoint` (resume) unpickles with `weights_only=False` inside DeepSpeed: resuming
trusts the checkpoint folder, as any DeepSpeed user does; export never does.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpoint(ValueError):
    """A file needs more than tensors and plain data to load: refused, nothing from it was run."""


def _allowed_globals() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_untrusted(path: str | Path, mmap: bool = False) -> Any:
    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpoint(f"{path}: refusing to load: it holds objects that could run code ({e})") from e


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """While inside, every torch.load in this process (DeepSpeed's zero_to_fp32 asks for weights_only=False)
    uses the weights-only unpickler with the allowed DeepSpeed types."""
    original = torch.load

    @functools.wraps(original)
    def safe(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpoint(f"{f}: refusing to load: it holds objects that could run code ({e})") from e

    with torch.serialization.safe_globals(_allowed_globals()):
        torch.load = safe
        try:
            yield
        finally:
            torch.load = original
