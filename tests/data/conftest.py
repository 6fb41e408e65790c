"""Shared fixtures: one tiny model + tokenizer per test session, and a config builder for data tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dtrain.config import Config, DataConfig, DatasetConfig, ModelConfig, TrainConfig
from dtrain.tiny import SAMPLE_DIR, make_tiny_model

SAMPLE = SAMPLE_DIR


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture
def make_cfg(tmp_path, tiny_dir):
    """Config(datasets=[(path, format) or DatasetConfig...], **data knobs); output and cache under tmp_path."""

    def build(*datasets, seed: int = 0, eval_datasets=(), **knobs) -> Config:
        def as_ds(d):
            return d if isinstance(d, DatasetConfig) else DatasetConfig(path=str(d[0]), format=d[1])

        data = DataConfig(
            datasets=[as_ds(d) for d in datasets], eval_datasets=[as_ds(d) for d in eval_datasets], **knobs
        )
        return Config(
            output_dir=str(tmp_path / "run"),
            model=ModelConfig(path=str(tiny_dir)),
            data=data,
            train=TrainConfig(seed=seed, max_steps=1, micro_batch_size=1, gradient_accumulation_steps=1),
        )

    return build
