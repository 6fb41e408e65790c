"""Hugging Face Hub ids for models and datasets: resolved where the user runs `check` / `prepare` / `submit` (a login
node with network: files are downloaded into the Hugging Face cache), read from that cache by the ranks, which run
with HF_HUB_OFFLINE=1 (`RANK_ENV`) so that a thousand ranks never call the Hub.

A path that exists locally is always a local path; anything else shaped like `org/name` is a repo id.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name; the Hub redirects old un-namespaced ids
RANK_ENV = {"HF_HUB_OFFLINE": "1"}  # the ranks read the cache the launcher filled; no Hub calls from compute nodes
# What from_pretrained needs from a model repo; other files (other formats, images, original checkpoints) are skipped.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]


class HubError(ValueError):
    """A repo id that cannot be resolved here; the message is one line saying how to get it."""


@dataclass(frozen=True)
class Resolved:
    local: Path
    """The folder to read: the path given, or the snapshot folder in the Hugging Face cache."""
    commit: str | None = None
    """The Hub commit the repo id resolved to; None for a local path."""


def is_hub_id(path: str) -> bool:
    return not Path(path).exists() and bool(HUB_ID.match(path))


def resolve(path: str, revision: str | None = None, repo_type: str = "model") -> Resolved:
    """A local folder as is; a repo id -> its snapshot in the cache (downloaded unless HF_HUB_OFFLINE is set)."""
    if not is_hub_id(path):
        return Resolved(Path(path))
    from huggingface_hub import constants

    return _resolve_repo(path, revision, repo_type, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=64)  # online, each resolution asks the Hub for the newest commit: once per process
def _resolve_repo(repo_id: str, revision: str | None, repo_type: str, cache: str, offline: bool) -> Resolved:
    from huggingface_hub import snapshot_download

    try:
        patterns = MODEL_FILES if repo_type == "model" else None
        folder = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns))
    except Exception as e:  # not cached while offline, unknown repo, no network, gated: all "not available here"
        flags = (f" --repo-type {repo_type}" if repo_type != "model" else "") + (
            f" --revision {revision}" if revision else ""
        )
        raise HubError(
            f"{repo_id}: not in the Hugging Face cache {cache} and not downloadable here "
            f"({type(e).__name__}); download it where there is network with `hf download {repo_id}{flags}` "
            "into the cache the ranks use (HF_HOME / HF_HUB_CACHE), or run `dtrain check` there"
        ) from None
    return Resolved(folder, commit=folder.name)
