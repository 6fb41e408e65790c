"""The on-disk cache of prepared data: its key, and one writer while every other rank waits.

Rank 0 prepares under a file lock (so two jobs sharing a cache never prepare the same data at once) and publishes
the result by renaming a finished temporary folder: a cache folder that exists is complete. Other ranks poll for
it. No torch.distributed collective is involved, so an hour of tokenization cannot trip a collective timeout.
If rank 0 fails it leaves `<key>.failed` with its error, and the waiting ranks raise it instead of waiting forever.
The cache folder must be on storage every node sees (like checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from dtrain.data.errors import DataError
from dtrain.data.knobs import DATASET_DEFAULTS, knob
from dtrain.data.sources import resolve_source

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the prepared layout or any tokenization rule changes
DONE_FILE = "report.json"  # written last inside the temporary folder; the rename publishes it


def cache_root(cfg) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output_dir).parent / ".dtrain-cache"


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything about the tokenizer that can change token ids: vocab, merges, normalizer, special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, type(tokenizer).__name__]
    chat = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(json.dumps([body, special, chat], default=str).encode()).hexdigest()


def memo_digest(path: Path, memo_dir: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime, inode): the first process to ask hashes it under a lock;
    every other one (the other ranks of the node, other nodes on shared storage, the next run) reads the memo."""
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    memo = memo_dir / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.sha256"
    if not memo.is_file():
        memo_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(memo) + ".lock"):
            if not memo.is_file():
                _write_atomic(memo, file_digest(path))
    return memo.read_text()


def cache_key(cfg, tokenizer) -> str:
    """Hash of everything that changes the prepared result; file contents count, file paths do not."""
    data = cfg.data
    memo_dir = cache_root(cfg) / "digests"

    def dataset_material(ds) -> dict:
        fields = {k: v for k, v in dataclasses.asdict(ds).items() if k != "path"}
        fields.update({name: knob(ds, name) for name in DATASET_DEFAULTS})
        return {"source": resolve_source(ds).content_key(lambda f: memo_digest(f, memo_dir)), **fields}

    # num_proc only changes how fast the same samples are made
    ignored = ("datasets", "eval_datasets", "cache_dir", "group_by_length", "num_proc")
    knobs = {k: v for k, v in dataclasses.asdict(data).items() if k not in ignored}
    seeded = (data.eval_fraction > 0 and not data.eval_datasets) or len(data.datasets) > 1
    material = {
        "version": CACHE_VERSION,
        "datasets": [dataset_material(ds) for ds in data.datasets],
        "eval_datasets": [dataset_material(ds) for ds in data.eval_datasets],
        "knobs": knobs,
        "seed": cfg.train.seed if seeded else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:20]


def is_complete(folder: Path) -> bool:
    return (folder / DONE_FILE).is_file()


def build_once(folder: Path, build: Callable[[Path], None], rank: int, poll_s: float = 1.0) -> bool:
    """Make sure `folder` holds a finished cache; rank 0 builds it with `build(tmp_folder)`. True if it existed."""
    if rank == 0:
        return _build_as_writer(folder, build)
    return _wait_for_writer(folder, poll_s)


def _failed_marker(folder: Path) -> Path:
    return folder.with_name(folder.name + ".failed")


def _build_as_writer(folder: Path, build: Callable[[Path], None]) -> bool:
    if is_complete(folder):
        return True
    folder.parent.mkdir(parents=True, exist_ok=True)
    _failed_marker(folder).unlink(missing_ok=True)
    with FileLock(str(folder.with_name(folder.name + ".lock"))):
        if is_complete(folder):  # another job finished it while we waited for the lock
            return True
        tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            _write_atomic(_failed_marker(folder), f"{type(e).__name__}: {e}")
            raise
        shutil.rmtree(folder, ignore_errors=True)  # only a foreign, incomplete folder can be here
        os.rename(tmp, folder)
    return False


def _wait_for_writer(folder: Path, poll_s: float) -> bool:
    start, last_note = time.time(), time.time()
    while not is_complete(folder):
        failed = _failed_marker(folder)
        # A marker older than this wait (minus clock skew between nodes) belongs to an earlier run.
        if failed.is_file() and failed.stat().st_mtime >= start - 60:
            raise DataError(f"rank 0 failed to prepare the data ({folder}): {failed.read_text()}")
        if time.time() - last_note > 300:
            log.info("still waiting for rank 0 to prepare %s (the cache dir must be on shared storage)", folder)
            last_note = time.time()
        time.sleep(poll_s)
    return True


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
