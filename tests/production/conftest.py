from __future__ import annotations

import pytest

from tests.production.runs import production_runs


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_model):
    """Every uninterrupted production-path run, trained in one 2-rank launch on first use."""
    return production_runs(tmp_path_factory, tiny_model)
