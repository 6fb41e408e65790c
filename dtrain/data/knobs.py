"""Defaults of the data knobs that issue 14 adds to the config, read through `knob()` until the config package
has the fields (the config is being restructured; this module goes away when they land there)."""

from __future__ import annotations

import os
from typing import Any

DATASET_DEFAULTS: dict[str, Any] = {
    "name": None,  # dataset configuration name (Hub datasets / folders with several configs)
    "split": "train",  # split to read from a folder, glob, save_to_disk folder or Hub dataset
    "revision": None,  # Hub dataset branch, tag or commit
    "data_files": None,  # str or list of file patterns inside a folder or Hub dataset
    "tools_field": "tools",  # format chat: the row's tool definitions, passed to apply_chat_template(tools=...)
    "roles_to_train": ["assistant"],  # format chat: messages of these roles are trained
}
DATA_DEFAULTS: dict[str, Any] = {
    "num_proc": None,  # tokenizing processes; None: the cores available to this process
}


def knob(section, name: str) -> Any:
    defaults = DATASET_DEFAULTS if name in DATASET_DEFAULTS else DATA_DEFAULTS
    return getattr(section, name, defaults[name])


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
