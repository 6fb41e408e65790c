from __future__ import annotations

from pathlib import Path

import pytest

from dtrain.dist import select_accelerator

select_accelerator()  # before anything imports deepspeed: cuda where there is a GPU, cpu elsewhere


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from dtrain.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def full_reference(tmp_path_factory, tiny_model):
    """full_reference(nproc) -> run folder of an uninterrupted tiny ZeRO-3 run on nproc ranks (run once per nproc)."""
    from tests.helpers import FULL_OVERRIDES, run_dtrain, write_config

    runs: dict[int, Path] = {}

    def get(nproc: int) -> Path:
        if nproc not in runs:
            root = tmp_path_factory.mktemp(f"reference-{nproc}rank")
            config = write_config(root / "cfg.yaml", tiny_model)
            run_dtrain("train", str(config), *FULL_OVERRIDES, "--nproc", str(nproc))
            runs[nproc] = root / "run"
        return runs[nproc]

    return get
