"""Sharded, atomic checkpoints: writing, restoring, pruning (the layout is in dtrain.checkpoint_layout).

All ranks write into `<dir>/.tmp-step-00000040/`, each one syncing every file it wrote to disk right after writing
it (in parallel, and on the node whose cache holds the data: on a shared file system only the writer's fsync makes
its data durable). Once every rank is done, rank 0 writes trainer_state.json, syncs it and the folders, and renames
the folder to its final name. A rename within one filesystem is atomic, so a folder named `step-*` is always
complete, and a crash at any moment leaves either the old set of checkpoints or the new one.
Resume `auto` picks the newest `step-*` folder that holds trainer_state.json and never looks at `.tmp-*` ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dtrain.build_once import remove_stale_staging
from dtrain.checkpoint_layout import (
    ENGINE_TAG,
    STATE_FILE,
    Progress,
    checkpoint_name,
    complete_checkpoints,
    read_progress,
)
from dtrain.config import Config, dump_yaml
from dtrain.fingerprint import run_fingerprints
from dtrain.nvme_optimizer import load_swapped_optimizer_state
from dtrain.strategies.protocol import CheckpointOptions


class CheckpointError(RuntimeError):
    """A save that could not complete; the checkpoints written before it are intact."""


class Checkpointer:
    """Decides when to save, writes checkpoints atomically, restores them, prunes old ones."""

    def __init__(self, cfg: Config, rank: int, device: torch.device, options: CheckpointOptions):
        self.cfg = cfg
        self.rank = rank
        self.device = device
        self.directory = cfg.checkpoint_dir
        self.save_options = options.save
        self.load_options = options.load

    def should_save(self, step: int, finished: bool, stopping: bool) -> bool:
        return finished or stopping or step % self.cfg.checkpoint.every_steps == 0

    def save(self, engine: Any, progress: Progress) -> Path:
        final = self.directory / checkpoint_name(progress.step)
        if (final / STATE_FILE).is_file():  # a resumed run reaching a step it already saved
            return final
        tmp = self.directory / f".tmp-{final.name}"
        self.directory.mkdir(parents=True, exist_ok=True)  # on every rank: each one checks its free space
        if self.rank == 0:
            self._clear_partial()
        self._check_space(engine, final.name)  # a collective: rank 0 has cleared leftovers when it returns
        try:
            save_rng_state(tmp / "rng" / f"rank-{self.rank:05d}.safetensors")
            # Every rank writes its own partition: optimizer state is sharded across ranks. DeepSpeed returns from
            # its closing barrier, when every rank's files are written (and synced, see _SyncingCheckpointEngine).
            if not isinstance(engine.checkpoint_engine, _SyncingCheckpointEngine):
                engine.checkpoint_engine = _SyncingCheckpointEngine(engine.checkpoint_engine)
            engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, client_state={}, save_latest=False, **self.save_options)
            if self.rank == 0:
                self._publish(tmp, final, progress)
        except OSError as e:
            raise CheckpointError(f"saving {final} failed on rank {self.rank}: {e}. {self._intact()}") from e
        dist.barrier()
        return final

    def _publish(self, tmp: Path, final: Path, progress: Progress) -> None:
        """Rank 0, once every rank's shards are written: metadata last, sync, then the atomic rename."""
        # format 2: RNG states in safetensors; fingerprints of the model, tokenizer and data (dtrain.resume_changes).
        state = {"progress": asdict(progress), "format": 2, "fingerprints": run_fingerprints(self.cfg)}
        _durable_write(tmp / "config.yaml", dump_yaml(self.cfg).encode())
        _durable_write(tmp / STATE_FILE, json.dumps(state, indent=2).encode())
        for folder, _, _ in os.walk(tmp):  # the entries of every file written (the files themselves are synced)
            _fsync_dir(Path(folder))
        if final.exists():  # an incomplete folder of that name (not ours: ours appear only whole) is replaced
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        self._prune()

    def _check_space(self, engine: Any, name: str) -> None:
        """Refuse, on every rank together and before writing anything, a save the file system cannot hold.

        A rank that ran out of space in the middle of DeepSpeed's save would leave the others waiting in its
        internal barrier until the collective timeout; checking first turns that into an immediate, clear error."""
        previous = complete_checkpoints(self.directory)
        # Consecutive checkpoints of a run have the same size; before the first one, estimate from the model.
        needed = tree_bytes(previous[-1]) if previous else _estimated_bytes(engine.module, self.save_options)
        free = shutil.disk_usage(self.directory).free
        short = torch.tensor([float(free < needed * 1.1)], device=self.device)
        dist.all_reduce(short, op=dist.ReduceOp.MAX)
        if short.item():
            raise CheckpointError(
                f"not enough space in {self.directory} for checkpoint {name}: it needs about {needed / 2**20:.1f} MiB, "
                f"{free / 2**20:.1f} MiB are free. {self._intact()}"
            )

    def _intact(self) -> str:
        found = complete_checkpoints(self.directory)
        if not found:
            return "No earlier checkpoint exists."
        return f"The previous checkpoint {found[-1].name} is intact: free space, then relaunch to resume from it."

    def load(self, engine: Any, checkpoint: Path, tag: str = ENGINE_TAG) -> Progress:
        load_path, _ = engine.load_checkpoint(
            str(checkpoint),
            tag=tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            **self.load_options,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no engine state in {checkpoint / tag}")
        if tag == ENGINE_TAG:  # universal checkpoints of NVMe optimizer states are refused (dtrain.reshard)
            load_swapped_optimizer_state(engine, checkpoint, tag)
        rng_file = checkpoint / "rng" / f"rank-{self.rank:05d}.safetensors"
        if rng_file.is_file():  # absent for a rank that did not exist when the checkpoint was saved
            load_rng_state(rng_file)
        return read_progress(checkpoint)

    def _clear_partial(self) -> None:
        """Leftovers of saves, prunes or universal conversions that a crash interrupted; never resumed from."""
        if self.directory.is_dir():
            for leftover in self.directory.glob(".tmp-step-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            for checkpoint in complete_checkpoints(self.directory):  # only a dead converter's: it may run elsewhere
                remove_stale_staging(checkpoint)
            _delete_in_background(list(self.directory.glob(".deleting-step-*")))

    def _prune(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        if keep == 0:
            return
        doomed = []
        for old in complete_checkpoints(self.directory)[:-keep]:
            # Renamed first so that a crash mid-delete never leaves a half-deleted folder that looks complete.
            doomed.append(old.with_name(f".deleting-{old.name}"))
            os.rename(old, doomed[-1])
        _delete_in_background(doomed)


def _delete_in_background(folders: list[Path]) -> None:
    """Deleting a checkpoint of a large model (~1 TB, many files) takes minutes on a network file system: done off
    the step path, while training goes on. A process that ends first leaves `.deleting-*` to the next save."""
    if folders:
        threading.Thread(target=_delete, args=(folders,), name="dtrain-prune", daemon=True).start()


def _delete(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def tree_bytes(root: Path) -> int:
    """Bytes of a checkpoint's own files (a cached universal conversion is not written by a save)."""
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, files in os.walk(root)
        if "universal" not in Path(folder).relative_to(root).parts
        for name in files
    )


def _estimated_bytes(module: torch.nn.Module, save_options: dict[str, Any]) -> int:
    """fp32 master weights + two Adam moments for what is trained, plus the weights themselves unless frozen ones
    are excluded. Under ZeRO-3 a parameter's full size is its ds_numel."""
    total = 0
    for param in module.parameters():
        numel = getattr(param, "ds_numel", param.numel())
        if param.requires_grad:
            total += numel * (12 + param.element_size())
        elif not save_options.get("exclude_frozen_parameters"):
            total += numel * param.element_size()
    return total


def save_rng_state(path: Path) -> None:
    """This process's RNG states as safetensors (no pickle: a checkpoint's files are data, never code)."""
    from safetensors.torch import save_file

    version, mt_state, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {
        "python": torch.tensor(mt_state, dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    metadata = {
        "python": json.dumps([version, gauss_next]),
        "numpy": json.dumps([kind, int(position), int(has_gauss), float(cached_gaussian)]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    _fsync_file(tmp)
    os.replace(tmp, path)


def load_rng_state(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    version, gauss_next = json.loads(metadata["python"])
    random.setstate((version, tuple(tensors["python"].tolist()), gauss_next))
    kind, position, has_gauss, cached_gaussian = json.loads(metadata["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


class _SyncingCheckpointEngine:
    """DeepSpeed's checkpoint engine, with each file synced to disk by the rank that wrote it, as soon as written."""

    def __init__(self, inner: Any):
        self._inner = inner

    def save(self, state_dict: Any, path: str) -> None:
        self._inner.save(state_dict, path)
        _fsync_file(path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _durable_write(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
