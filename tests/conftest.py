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
def reference_run(tmp_path_factory, tiny_model):
    """reference_run(base, nproc, *overrides) -> run folder of an uninterrupted tiny run (run once per arguments)."""
    from tests.helpers import FULL_OVERRIDES, run_dtrain, write_config

    runs: dict[tuple, Path] = {}

    def get(base: str, nproc: int, *overrides: str) -> Path:
        key = (base, nproc, overrides)
        if key not in runs:
            root = tmp_path_factory.mktemp(f"reference-{Path(base).stem}-{nproc}rank")
            config = write_config(root / "cfg.yaml", tiny_model, base=base)
            run_dtrain("train", str(config), *FULL_OVERRIDES, *overrides, "--nproc", str(nproc))
            runs[key] = root / "run"
        return runs[key]

    return get


@pytest.fixture(scope="session")
def full_reference(reference_run):
    """full_reference(nproc) -> run folder of an uninterrupted tiny ZeRO-3 run on nproc ranks."""
    return lambda nproc: reference_run("configs/tiny-full-zero3.yaml", nproc)
