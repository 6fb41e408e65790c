"""Data-test fixtures on the session's tiny model (`tiny_model`, a folder: tests/conftest.py): its tokenizer, the
model loaded for forward passes, and a config builder."""

from __future__ import annotations

import pytest
import torch

from dtrain.config import Config, DataConfig, DatasetConfig, ModelConfig, TrainConfig


@pytest.fixture(autouse=True)
def private_hf_caches(tmp_path, monkeypatch):
    """`datasets` and the Hub cache inside tmp_path, offline: no test writes to ~/.cache or reaches for the network.
    Returns the Hub cache folder (see tests/hub_cache.py to fill it)."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def loaded_tiny_model(tiny_model) -> torch.nn.Module:
    """The tiny model as a module, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


@pytest.fixture
def make_cfg(tmp_path, tiny_model):
    """Config(datasets=[(path, format) or DatasetConfig...], **data knobs); output and cache under tmp_path."""

    def build(*datasets, seed: int = 0, eval_datasets=(), **knobs) -> Config:
        def as_ds(d):
            return d if isinstance(d, DatasetConfig) else DatasetConfig(path=str(d[0]), format=d[1])

        data = DataConfig(
            datasets=[as_ds(d) for d in datasets], eval_datasets=[as_ds(d) for d in eval_datasets], **knobs
        )
        return Config(
            output_dir=str(tmp_path / "run"),
            model=ModelConfig(path=str(tiny_model)),
            data=data,
            train=TrainConfig(seed=seed, max_steps=1, micro_batch_size=1, gradient_accumulation_steps=1),
        )

    return build
