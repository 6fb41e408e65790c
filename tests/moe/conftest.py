from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory, tiny_model):
    """tiny_moe(model_type) -> folder of a tiny random-init model of that family (tests/moe/models.py), made once."""
    from tests.moe.models import make_tiny_moe

    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = make_tiny_moe(tiny_model, tmp_path_factory.mktemp(model_type), model_type)
        return made[model_type]

    return get
