"""The run configuration: one YAML file -> typed, nested dataclasses, each section checking its own fields.

typed.py      YAML reading (the one place), the YAML -> dataclass converter, overrides, ConfigError
model.py      model / lora / quantization sections
data.py       data and dataset sections
train.py      optimization section
deepspeed.py  ZeRO / offload section and the rule which layouts exist
run.py        checkpoint / logging / eval sections, the top-level Config, load_config
reference.py  the README's config reference, generated from the field docstrings
"""

from dtrain.config.data import DataConfig, DatasetConfig
from dtrain.config.deepspeed import DeepSpeedConfig, OffloadConfig, zero_layout_problems
from dtrain.config.model import LoraConfig, ModelConfig, QuantizationConfig
from dtrain.config.run import (
    CheckpointConfig,
    Config,
    EvalConfig,
    LoggingConfig,
    config_from_dict,
    dump_yaml,
    load_config,
)
from dtrain.config.train import TrainConfig
from dtrain.config.typed import ConfigError, apply_override, load_typed, read_yaml

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DatasetConfig", "DeepSpeedConfig", "EvalConfig",
    "LoggingConfig", "LoraConfig", "ModelConfig", "OffloadConfig", "QuantizationConfig", "TrainConfig",
    "apply_override", "config_from_dict", "dump_yaml", "load_config", "load_typed", "read_yaml",
    "zero_layout_problems",
]  # fmt: skip
