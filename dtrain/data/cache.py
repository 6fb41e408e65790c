"""The on-disk cache of prepared data: where it is and its key (hash of everything that changes the result).

Rank 0 prepares it and the other ranks wait for it through dtrain.build_once (no collective; a rank-0 failure
reaches them at once). The cache folder must be on storage every node sees (like checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from filelock import FileLock

from dtrain.data.sources import resolve_source

CACHE_VERSION = 2  # bump when the prepared layout or any tokenization rule changes
DONE_FILE = "report.json"  # written last inside the temporary folder; the rename publishes it


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
                tmp = memo.with_name(f"{memo.name}.tmp-{os.getpid()}")
                tmp.write_text(file_digest(path))
                os.replace(tmp, memo)  # readers never see a half-written digest
    return memo.read_text()


def cache_key(cfg, tokenizer) -> str:
    """Hash of everything that changes the prepared result; file contents count, file paths do not."""
    data = cfg.data
    memo_dir = cfg.cache_dir / "digests"

    def dataset_material(ds) -> dict:
        fields = {k: v for k, v in dataclasses.asdict(ds).items() if k != "path"}
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
    if cfg.eval.retention:  # only then: a run without retention sets keeps its cache
        material["retention"] = {name: dataset_material(ds) for name, ds in cfg.eval.retention.items()}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:20]


def is_complete(folder: Path) -> bool:
    return (folder / DONE_FILE).is_file()
