"""Fingerprints of what a run was trained on (model, tokenizer, data files), stored in every checkpoint so that a
resumed run can prove it is the same run. Path-independent (a moved folder keeps its fingerprint) and cheap: the
model's config.json and index are hashed with its weight files' names and sizes (not 140 GB of weights), a data
file by its size with its first and last MiB.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
_EDGE = 1 << 20


def model_fingerprint(path: str | Path) -> str:
    folder, digest = Path(path), hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    weights = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.suffix in _WEIGHTS and p.is_file())
    digest.update(json.dumps(weights).encode())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(path: str | Path) -> str:
    folder, digest = Path(path), hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    size, digest = Path(path).stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_EDGE))
        if size > 2 * _EDGE:
            f.seek(size - _EDGE)
        digest.update(f.read(_EDGE))
    return f"{size}:{digest.hexdigest()[:16]}"


def run_fingerprints(cfg) -> dict[str, str]:
    """What a checkpoint of `cfg` records: `model`, `tokenizer`, and one entry per dataset by its config key. A Hub
    repo id is its resolved commit (so a moved branch is caught on resume)."""
    from dtrain.hub import resolve

    model = resolve(cfg.model.path, cfg.model.revision)
    prints = {
        "model": f"hub commit {model.commit}" if model.commit else model_fingerprint(model.local),
        "tokenizer": tokenizer_fingerprint(cfg.model.tokenizer_dir()),
    }
    for section in ("datasets", "eval_datasets"):
        for i, ds in enumerate(getattr(cfg.data, section)):
            prints[f"data.{section}[{i}].path"] = dataset_fingerprint(ds)
    return prints


def dataset_fingerprint(ds) -> str:
    from dtrain.data.sources import resolve_source

    source = resolve_source(ds)
    if source.commit:
        return f"hub commit {source.commit}"
    if source.kind == "file":
        return file_fingerprint(source.local)
    files = source.files()
    names = [str(f.relative_to(source.local)) if source.local else "" for f in files]
    listing = [[name, file_fingerprint(f)] for name, f in zip(names, files, strict=True)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
