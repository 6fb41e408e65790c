"""Fingerprints of what a run was trained on (model, tokenizer, data files), stored in every checkpoint so that a
resumed run can prove it is the same run. Path-independent (a moved folder keeps its fingerprint) and cheap: the
model's config.json and index, and each weight file's name, size and three 64 KiB samples (start, middle, end: two
models of the same shape differ there; 140 GB of weights are never read whole); a data file by its size with its
first and last MiB.
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
    """ "" when `path` is no folder (nothing to compare)."""
    folder, digest = Path(path), hashlib.sha256()
    if not folder.is_dir():
        return ""
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    for weights in sorted(p for p in folder.iterdir() if p.suffix in _WEIGHTS and p.is_file()):
        digest.update(json.dumps([weights.name, weights.stat().st_size]).encode() + _samples(weights, 3, 1 << 16))
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(path: str | Path) -> str:
    folder, digest = Path(path), hashlib.sha256()
    if not folder.is_dir():
        return ""
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    size = Path(path).stat().st_size
    return f"{size}:{hashlib.sha256(_samples(Path(path), 2, _EDGE)).hexdigest()[:16]}"


def _samples(path: Path, count: int, length: int) -> bytes:
    """`count` chunks of `length` bytes spread evenly from the start to the end of the file (all of a small one)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= count * length:
            return f.read()
        chunks = []
        for i in range(count):
            f.seek((size - length) * i // (count - 1))
            chunks.append(f.read(length))
        return b"".join(chunks)


def run_fingerprints(cfg) -> dict[str, str]:
    """What a checkpoint of `cfg` records: `model`, `tokenizer`, and one entry per data file by its config key."""
    prints = {"model": model_fingerprint(cfg.model.path), "tokenizer": tokenizer_fingerprint(cfg.tokenizer_path)}
    for section in ("datasets", "eval_datasets"):
        for i, ds in enumerate(getattr(cfg.data, section)):
            if Path(ds.path).is_file():
                prints[f"data.{section}[{i}].path"] = file_fingerprint(ds.path)
    return {what: value for what, value in prints.items() if value}
