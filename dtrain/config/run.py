"""The whole run config: sections for checkpoints, logging and eval, the top-level `Config`, and loading.

Loading is YAML -> overrides -> typed dataclasses (type problems collected) -> each section's own checks -> the
strategy's rules (which sections and combinations it accepts). One ConfigError lists every problem.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dtrain.config.data import DataConfig, DatasetConfig
from dtrain.config.deepspeed import DeepSpeedConfig, optimizer_states_problems, precision_stage_problems
from dtrain.config.model import LoraConfig, ModelConfig, QuantizationConfig
from dtrain.config.train import TrainConfig
from dtrain.config.typed import ConfigError, apply_override, convert, flatten, guarded, read_yaml


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Checkpoint folder; default <output_dir>/checkpoints. Must be on storage every node sees."""
    every_steps: int = 100
    """Save every this many optimizer steps (and always at the end, and on preemption)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted after a newer one is complete. 0 keeps all."""
    resume: str = "auto"
    """auto: newest complete checkpoint if any; never: start fresh (refuses a non-empty dir); or a checkpoint path."""
    allow_changes: list[str] = field(default_factory=list)
    """Config keys (or sections, e.g. data) a resumed run may change although they change what is trained; other
    such changes are refused on resume. Changes that alter tensor shapes (strategy, adapter shape, optimizer) can
    never be resumed from, and schedule length, cadences and keep_last may always change."""

    def problems(self) -> list[str]:
        problems = []
        known = flatten(Config().to_dict())
        for i, key in enumerate(self.allow_changes):
            if not any(k == key or k.startswith(key + ".") or k.startswith(key + "[") for k in known):
                problems.append(f"checkpoint.allow_changes[{i}]: {key} is no config key")
        if self.every_steps < 1:
            problems.append(f"checkpoint.every_steps: must be >= 1, got {self.every_steps}")
        if self.keep_last < 0:
            problems.append(f"checkpoint.keep_last: must be >= 0 (0 keeps all), got {self.keep_last}")
        if not self.resume:
            problems.append("checkpoint.resume: auto, never, or a checkpoint path")
        elif self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            problems.append(
                f"checkpoint.resume: {self.resume} is neither auto, never, nor an existing checkpoint folder"
            )
        return problems


@dataclass
class LoggingConfig:
    every_steps: int = 1
    """Scalars (loss, lr, grad norm, tokens/s, step time) are logged every this many steps."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where scalars go besides metrics.jsonl: tensorboard (<output_dir>/tensorboard), wandb (mode and project from
    WANDB_MODE / WANDB_PROJECT), mlflow (MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db). wandb and
    mlflow are extras: pip install 'dtrain[wandb]' / 'dtrain[mlflow]'."""
    progress_bar: bool = True
    """tqdm bar on rank 0."""

    def problems(self) -> list[str]:
        from dtrain.reporters import REPORTERS

        problems = [f"logging.every_steps: must be >= 1, got {self.every_steps}"] if self.every_steps < 1 else []
        for name in self.report_to:
            if name not in REPORTERS:
                problems.append(f"logging.report_to: unknown {name!r}; choose from {', '.join(REPORTERS)}")
        return problems


@dataclass
class ExportConfig:
    on_finish: str = "none"
    """Export written by rank 0 when training finishes (not when preempted), into <output_dir>/<kind>: none, adapter
    (lora/qlora: PEFT folder), merged (lora/qlora: base + adapter) or hf (full: consolidated model)."""

    def problems(self, strategy: str) -> list[str]:
        from dtrain import strategies

        if self.on_finish == "none" or strategy not in strategies.NAMES:
            return []
        kinds = strategies.get(strategy).export_kinds
        if self.on_finish not in kinds:
            return [f"export.on_finish: must be none or one of {', '.join(kinds)} for strategy {strategy}"]
        return []


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Eval loss on the held-out split and eval.retention every this many steps; 0 only at the end (if there is
    eval data)."""
    max_batches: int | None = None
    """Cap on eval micro batches per rank."""
    retention: dict[str, DatasetConfig] = field(default_factory=dict)
    """General-domain datasets (name -> a dataset entry as in data.datasets; format text typical) whose loss shows
    what the fine-tune cost the base: measured on the base before the first step and at every eval, logged as
    retention/<name>/loss and retention/<name>/drift (the change since step 0). The step-0 loss is stored in every
    checkpoint, so a resumed run reports drift from the same baseline."""

    def problems(self, check_paths: bool = True) -> list[str]:
        problems = []
        if self.every_steps < 0:
            problems.append(f"eval.every_steps: must be >= 0, got {self.every_steps}")
        if self.max_batches is not None and self.max_batches < 1:
            problems.append(f"eval.max_batches: must be >= 1, got {self.max_batches}")
        for name, ds in self.retention.items():
            if not name or "/" in name or name != name.strip():
                problems.append(f"eval.retention.{name}: a name must be non-empty, without '/' or edge spaces")
            problems += ds.problems(f"eval.retention.{name}", check_paths)
        return problems


@dataclass
class Config:
    output_dir: str = ""
    """Run folder: checkpoints, tensorboard, metrics.jsonl."""
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: str = "full"
    """full: every weight (ZeRO); lora: adapters on a frozen base; qlora: adapters on a 4-bit NF4 base."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.output_dir) / "checkpoints"

    @property
    def cache_dir(self) -> Path:
        """Prepared data and the model's module list; next to the run folder unless data.cache_dir says where."""
        return Path(self.data.cache_dir) if self.data.cache_dir else Path(self.output_dir).parent / ".dtrain-cache"

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.output_dir) / "tensorboard"

    @property
    def tokenizer_path(self) -> str:
        return self.model.tokenizer_path or self.model.path

    def dataset_entries(self) -> list[tuple[str, DatasetConfig]]:
        """Every dataset the run reads (training, eval, retention), with its dotted key."""
        entries = [(f"data.datasets[{i}]", ds) for i, ds in enumerate(self.data.datasets)]
        entries += [(f"data.eval_datasets[{i}]", ds) for i, ds in enumerate(self.data.eval_datasets)]
        return entries + [(f"eval.retention.{name}", ds) for name, ds in self.eval.retention.items()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def problems(self, check_paths: bool = True) -> list[str]:
        from dtrain import strategies

        problems = []
        checks = [
            lambda: _run_folder_problems("output_dir", self.output_dir, self.model.path, required=True),
            lambda: _run_folder_problems("checkpoint.dir", self.checkpoint.dir, self.model.path, required=False),
            lambda: self.model.problems(check_paths),
            lambda: self.data.problems(check_paths),
            self.train.problems,
            self.deepspeed.problems,
            lambda: precision_stage_problems(self.train.precision, self.deepspeed.stage),
            lambda: optimizer_states_problems(
                self.train.optimizer_states,
                self.train.precision,
                self.train.optimizer,
                self.deepspeed.offload_optimizer.device,
            ),
            self.quantization.problems,
            self.checkpoint.problems,
            lambda: self.eval.problems(check_paths),
            self.logging.problems,
            lambda: self.export.problems(self.strategy),
        ]
        if self.strategy in strategies.NAMES:
            strategy = strategies.get(self.strategy)
            checks.append(lambda: strategy.config_problems(self))
            ds = self.deepspeed
            checks.append(
                lambda: strategy.zero_problems(ds.stage, ds.offload_optimizer.device, ds.offload_param.device)
            )
        elif isinstance(self.strategy, str):  # another type is already reported by the conversion
            problems.append(f"strategy: must be one of {', '.join(map(repr, strategies.NAMES))}, got {self.strategy!r}")
        for check in checks:
            problems += guarded(check)
        return problems


def _run_folder_problems(key: str, folder: str | None, model_path: str, required: bool) -> list[str]:
    """A folder dtrain will create and write: a name the file system can hold, not a file, not the base model's."""
    if not folder:
        return [f"{key}: required (the run folder for checkpoints and logs)"] if required else []
    if "\0" in folder:
        return [f"{key}: contains a NUL byte"]
    path = Path(folder)
    limit = _name_max(path)
    for name in path.parts:
        if len(os.fsencode(name)) > limit:
            return [f"{key}: the name {name[:24]!r}... is {len(os.fsencode(name))} bytes, longer than the file "
                    f"system allows ({limit})"]  # fmt: skip
    if path.exists() and not path.is_dir():
        return [f"{key}: {folder} exists and is a file"]
    if model_path and _inside(path, Path(model_path)):
        return [f"{key}: {folder} is inside the base model's folder {model_path}; write runs elsewhere"]
    return []


def _name_max(path: Path) -> int:
    """The longest file name the file system that would hold `path` accepts (255 bytes on most)."""
    for folder in path.absolute().parents:
        try:
            return os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):  # not there (yet), or a name in it too long to look up
            continue
    return 255


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def load_config(path: str | os.PathLike, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Read, override, convert and validate. Raises ConfigError listing every problem."""
    return config_from_dict(read_yaml(path) or {}, overrides, str(path), check_paths)


def config_from_dict(
    raw: Any, overrides: list[str] = (), source: str | None = None, check_paths: bool = True
) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(["top level: expected a mapping of sections"], source)
    problems: list[str] = []
    for item in overrides:
        problems += apply_override(raw, item)
    cfg = convert(Config, raw, "", problems)
    problems += cfg.problems(check_paths)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
