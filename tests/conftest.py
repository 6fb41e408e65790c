from __future__ import annotations

from pathlib import Path

import pytest

from dtrain.dist import select_accelerator

select_accelerator()  # before anything imports deepspeed: cuda where there is a GPU, cpu elsewhere


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from dtrain.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
