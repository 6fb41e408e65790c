"""A Hugging Face Hub cache folder built locally, in the layout huggingface_hub reads (no network in tests).

    add_to_hub_cache(cache, "acme/chats", folder, repo_type="dataset", revision="main")
    # cache/datasets--acme--chats/{refs/main, snapshots/<commit>/..., blobs/<sha256>}

Point HF_HUB_CACHE at `cache` and set HF_HUB_OFFLINE=1 (subprocesses), or patch huggingface_hub.constants in-process
(`offline_hub` fixture of the test module), then use the repo id.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, repo_type: str = "model", revision: str = "main") -> str:
    """Copy `folder` in as one commit of `repo_id`, reachable as `revision`; returns the commit hash."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    digest = hashlib.sha1(repo_id.encode())
    for f in files:
        digest.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    commit = digest.hexdigest()
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    for f in files:
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        link = repo / "snapshots" / commit / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit
