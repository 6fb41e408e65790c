"""The on-disk cache of prepared data: where it is and its key (hash of everything that changes the result).

Rank 0 prepares it and the other ranks wait for it through dtrain.build_once (no collective; a rank-0 failure
reaches them at once). The cache folder must be on storage every node sees (like checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

CACHE_VERSION = 1  # bump when the prepared layout or any tokenization rule changes
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


def cache_key(cfg, tokenizer) -> str:
    """Hash of everything that changes the prepared result; file contents count, file paths do not."""
    data = cfg.data

    def dataset_material(ds) -> dict:
        fields = {k: v for k, v in dataclasses.asdict(ds).items() if k != "path"}
        return {"sha256": file_digest(ds.path), **fields}

    knobs = {
        k: v
        for k, v in dataclasses.asdict(data).items()
        if k not in ("datasets", "eval_datasets", "cache_dir", "group_by_length")
    }
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
