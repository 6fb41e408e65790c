"""The run configuration: one YAML file -> typed, nested dataclasses.

Every problem (unknown key, wrong type, inconsistent values) is collected with its dotted key path and reported
at once, so a user fixes a config in one pass, before any process is launched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import string
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """All problems found in a config, each prefixed by its dotted key path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")


@dataclass
class ModelConfig:
    path: str = ""
    """Local Hugging Face model directory (config.json, safetensors, tokenizer files). No hub downloads."""
    tokenizer_path: str | None = None
    """Tokenizer directory when it is not the model directory."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less activation memory, ~30 % more compute."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers. flash_attention_2 needs CUDA and the flash-attn package."""


@dataclass
class LoraConfig:
    r: int = 16
    """Adapter rank: higher increases capacity and memory."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input during training."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt, or "all-linear"."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained alongside the adapters."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens)."""


@dataclass
class QuantizationConfig:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base (qlora)."""
    double_quant: bool = True
    """Quantize the quantization constants too (~0.4 bit/param saved)."""
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Dtype the 4-bit weights are dequantized to for matmuls."""


@dataclass
class DatasetConfig:
    path: str = ""
    """Local file: .jsonl, .json, .parquet or .csv."""
    format: Literal["text", "instruction", "chat"] = "text"
    """text: raw text; instruction: alpaca fields; chat: a list of messages."""
    weight: float = 1.0
    """Mixture weight: the share of training examples drawn from this dataset relative to the others. The epoch
    keeps the total example count of all datasets; each gets round(total x weight / sum of weights) examples (whole
    repeats plus a seeded subset), fixed at preparation. Ignored with a single dataset."""
    text_field: str = "text"
    """Field holding the text (format: text)."""
    instruction_field: str = "instruction"
    """Field holding the instruction (format: instruction)."""
    input_field: str = "input"
    """Optional field with extra input (format: instruction); missing or empty means none."""
    output_field: str = "output"
    """Field holding the answer that is trained on (format: instruction)."""
    messages_field: str = "messages"
    """Field holding the list of messages (format: chat)."""
    role_field: str = "role"
    """Key of a message's role; "from" for sharegpt-style data."""
    content_field: str = "content"
    """Key of a message's text; "value" for sharegpt-style data."""
    role_map: dict[str, str] = field(default_factory=dict)
    """Maps roles in the file to system/user/assistant, e.g. {human: user, gpt: assistant} (those two sharegpt
    names are understood without a map)."""


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    """Training datasets; at least one."""
    seq_len: int = 512
    """Tokens per training sequence (packed block or padded row)."""
    packing: bool = True
    """Pack several examples into each seq_len block; attention never crosses a document boundary."""
    overlong: Literal["truncate", "drop", "split"] = "truncate"
    """An example longer than seq_len is truncated, dropped, or (format: text only) split into seq_len chunks that
    are trained as separate documents. Each case is counted in the prepare report."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row stops preparation with file:line, or is skipped and counted in the report."""
    eval_fraction: float = 0.0
    """Share of the training examples held out for eval loss (ignored when eval_datasets is set)."""
    eval_datasets: list[DatasetConfig] = field(default_factory=list)
    """Separate eval datasets; when empty and eval_fraction > 0, a held-out split of the training data."""
    chat_template: str | None = None
    """Jinja chat template for tokenizers without one (format: chat)."""
    instruction_template: str = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
    """Prompt template for format: instruction; {input_block} is '### Input:\n{input}\n\n' or empty."""
    group_by_length: bool = False
    """Without packing: batch examples of similar length together to reduce padding
    (dtrain.data.grouping.group_by_length)."""
    cache_dir: str | None = None
    """Where tokenized data is cached; default <output_dir>/../.dtrain-cache."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    """Sequences per rank per forward/backward."""
    gradient_accumulation_steps: int | None = None
    """Micro batches per optimizer step; exclusive with global_batch_size."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks; accumulation is derived from it and the world size."""
    lr: float = 2e-5
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of decay, as a fraction of lr."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    max_steps: int | None = None
    """Optimizer steps to run; exclusive with epochs."""
    epochs: float | None = None
    """Passes over the training data; exclusive with max_steps."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping; 0 disables."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW beta1, beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    optimizer: Literal["adamw_torch", "adamw_deepspeed", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = (
        "adamw_torch"
    )
    """adamw_torch: torch AdamW, bitwise-exact resume; adamw_deepspeed: DeepSpeed's fused/CPU Adam (fastest with
    offload); adamw_8bit / paged_*: bitsandbytes optimizers (lora/qlora)."""
    seed: int = 42
    """Seeds model init of new modules, data order, dropout."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Training precision. bf16 keeps fp32 master weights in the optimizer."""


@dataclass
class OffloadConfig:
    device: Literal["none", "cpu", "nvme"] = "none"
    """Where the state lives between uses."""
    nvme_path: str | None = None
    """Directory on a local NVMe drive (device: nvme)."""
    pin_memory: bool = False
    """Page-locked host buffers: faster GPU transfers, more host memory pinned."""


@dataclass
class DeepSpeedConfig:
    stage: int = 3
    """ZeRO stage: 0 plain data parallel, 1 optimizer, 2 +gradients, 3 +parameters partitioned."""
    offload_optimizer: OffloadConfig = field(default_factory=OffloadConfig)
    """Optimizer state offload (stage >= 1)."""
    offload_param: OffloadConfig = field(default_factory=OffloadConfig)
    """Parameter offload (stage 3 only)."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient reduce bucket."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """Elements of parameters prefetched ahead of use (stage 3)."""
    stage3_param_persistence_threshold: int = 100_000
    """Parameters smaller than this many elements stay unpartitioned (stage 3)."""
    stage3_max_live_parameters: int = 1_000_000_000
    """Upper bound of gathered parameter elements alive at once (stage 3)."""
    timeout_minutes: int = 30
    """Collective timeout of the process group."""


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


@dataclass
class LoggingConfig:
    every_steps: int = 1
    """Scalars (loss, lr, grad norm, tokens/s, step time) are logged every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard events to <output_dir>/tensorboard."""
    progress_bar: bool = True
    """tqdm bar on rank 0."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Eval loss on the held-out split every this many steps; 0 only at the end (if there is eval data)."""
    max_batches: int | None = None
    """Cap on eval micro batches per rank."""


@dataclass
class Config:
    output_dir: str = ""
    """Run folder: checkpoints, tensorboard, metrics.jsonl."""
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: Literal["full", "lora", "qlora"] = "full"
    """full: every weight (ZeRO); lora: adapters on a frozen base; qlora: adapters on a 4-bit NF4 base."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.output_dir) / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.output_dir) / "tensorboard"

    @property
    def tokenizer_path(self) -> str:
        return self.model.tokenizer_path or self.model.path

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML -> dict -> overrides -> dataclasses (type errors collected) -> cross-field validation


def load_config(path: str | os.PathLike, overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Read, override, convert and validate. Raises ConfigError listing every problem."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError([f"cannot read config: {e.strerror}"], source) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"invalid YAML: {e}"], source) from e
    return config_from_dict(raw, overrides, source, check_paths)


def config_from_dict(
    raw: Any, overrides: list[str] = (), source: str | None = None, check_paths: bool = True
) -> Config:
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(["top level: expected a mapping of sections"], source)
    for item in overrides:
        problems += apply_override(raw, item)
    cfg = _convert(Config, raw, "", problems)
    problems += validate(cfg, check_paths)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def apply_override(raw: dict, item: str) -> list[str]:
    """Apply `a.b.c=value` (value parsed as a YAML scalar/list) to the raw dict in place."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        return [f"override {item!r}: expected key.sub=value"]
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return [f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section"]
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        node[parts[-1]] = value
    return []


def load_typed(tp: type[T], path: str | os.PathLike, validate: Callable[[T], list[str]] | None = None) -> T:
    """Any YAML file -> dataclass `tp` with the same rules as run configs: types checked, unknown keys rejected,
    then `validate(obj)` for cross-field problems; raises one ConfigError listing every problem (used for the
    Slurm cluster profiles)."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError([f"cannot read: {e.strerror}"], source) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"invalid YAML: {e}"], source) from e
    problems: list[str] = []
    obj = _convert(tp, raw, "", problems)
    if validate is not None:
        try:
            problems += validate(obj)
        except TypeError:  # a value of the wrong type, already reported by the conversion
            pass
    if problems:
        raise ConfigError(problems, source)
    return obj


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _convert(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Convert `value` to type `tp`, appending `key: problem` for every mismatch; returns a best-effort value."""
    where = key or "top level"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a section (mapping), got {_describe(value)}")
            return tp()
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        for unknown in sorted(set(value) - names, key=str):
            known = ", ".join(sorted(names))
            problems.append(f"{key + '.' if key else ''}{unknown}: unknown key (known here: {known})")
        kwargs = {
            name: _convert(hints[name], value[name], f"{key + '.' if key else ''}{name}", problems)
            for name in names
            if name in value
        }
        return tp(**kwargs)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            trial: list[str] = []
            converted = _convert(option, value, key, trial)
            if not trial:
                return converted
        names = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
        problems.append(f"{where}: expected {names}, got {_describe(value)}")
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            problems.append(f"{where}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {_describe(value)}")
            return []
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {_describe(value)}")
            return {}
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(val_tp, v, f"{key}.{k}", problems) for k, v in value.items()}
    return _convert_scalar(tp, value, where, problems)


def _convert_scalar(tp: type, value: Any, where: str, problems: list[str]) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-5" as a string; accept what is plainly a number
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")
    return value


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a section"
    if typing.get_origin(tp) is list:
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


# ---------------------------------------------------------------------------------------------------------------
# Cross-field validation: values that are each fine alone but make no sense together, and paths that must exist.


def validate(cfg: Config, check_paths: bool = True) -> list[str]:
    checks = [
        lambda: _validate_model(cfg, check_paths),
        lambda: _validate_data(cfg.data, check_paths),
        lambda: _validate_train(cfg.train, cfg.strategy),
        lambda: _validate_deepspeed(cfg.deepspeed, cfg.strategy),
        lambda: _validate_lora(cfg),
        lambda: _validate_checkpoint(cfg.checkpoint, cfg.eval, cfg.logging),
    ]
    problems = [] if cfg.output_dir else ["output_dir: required (the run folder for checkpoints and logs)"]
    for check in checks:
        try:
            problems += check()
        except TypeError:  # a value of the wrong type, already reported by the conversion
            pass
    return problems


def _validate_model(cfg: Config, check_paths: bool) -> list[str]:
    problems = []
    if not cfg.model.path:
        problems.append("model.path: required (a local Hugging Face model directory)")
    elif check_paths and not (Path(cfg.model.path) / "config.json").is_file():
        problems.append(f"model.path: {cfg.model.path} has no config.json (expected a Hugging Face model directory)")
    if check_paths and cfg.model.tokenizer_path and not Path(cfg.model.tokenizer_path).is_dir():
        problems.append(f"model.tokenizer_path: {cfg.model.tokenizer_path} is not a directory")
    return problems


def _validate_data(data: DataConfig, check_paths: bool) -> list[str]:
    problems = []
    if not data.datasets:
        problems.append("data.datasets: at least one training dataset is required")
    for section, datasets in (("datasets", data.datasets), ("eval_datasets", data.eval_datasets)):
        for i, ds in enumerate(datasets):
            key = f"data.{section}[{i}]"
            if not ds.path:
                problems.append(f"{key}.path: required")
            elif Path(ds.path).suffix not in (".jsonl", ".json", ".parquet", ".csv"):
                problems.append(f"{key}.path: {ds.path}: unsupported file type (use .jsonl, .json, .parquet, .csv)")
            elif check_paths and not Path(ds.path).is_file():
                problems.append(f"{key}.path: {ds.path} does not exist")
            if ds.weight <= 0:
                problems.append(f"{key}.weight: must be > 0, got {ds.weight}")
    if data.seq_len < 8:
        problems.append(f"data.seq_len: must be >= 8, got {data.seq_len}")
    if not 0.0 <= data.eval_fraction < 1.0:
        problems.append(f"data.eval_fraction: must be in [0, 1), got {data.eval_fraction}")
    for section, datasets in (("datasets", data.datasets), ("eval_datasets", data.eval_datasets)):
        for i, ds in enumerate(datasets):
            for role, target in ds.role_map.items():
                if target not in ("system", "user", "assistant"):
                    problems.append(f"data.{section}[{i}].role_map.{role}: must map to system, user or assistant")
            if data.overlong == "split" and ds.format != "text":
                problems.append(f"data.overlong: split applies to format text only; data.{section}[{i}] is {ds.format}")
    if any(ds.format == "instruction" for ds in data.datasets + data.eval_datasets):
        problems += [
            f"data.instruction_template: {p}" for p in _instruction_template_problems(data.instruction_template)
        ]
    if data.chat_template is not None and not data.chat_template.strip():
        problems.append("data.chat_template: empty; remove it to use the tokenizer's template")
    if data.group_by_length and data.packing:
        problems.append("data.group_by_length: only with data.packing false (packed blocks are all seq_len long)")
    return problems


def _instruction_template_problems(template: str) -> list[str]:
    """A str.format template with {instruction} and optionally {input} / {input_block}, nothing else."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        return [f"not a valid format string ({e}); write literal braces as {{{{ and }}}}"]
    known = {"instruction", "input", "input_block"}
    problems = [
        f"unknown placeholder {{{n}}} (known: {{instruction}}, {{input}}, {{input_block}})"
        for n in sorted(names - known)
    ]
    if "instruction" not in names:
        problems.append("must contain {instruction}")
    return problems


def _validate_train(train: TrainConfig, strategy: str) -> list[str]:
    problems = []
    if train.micro_batch_size < 1:
        problems.append(f"train.micro_batch_size: must be >= 1, got {train.micro_batch_size}")
    if (train.gradient_accumulation_steps is None) == (train.global_batch_size is None):
        problems.append("train.gradient_accumulation_steps / train.global_batch_size: set exactly one")
    if train.gradient_accumulation_steps is not None and train.gradient_accumulation_steps < 1:
        problems.append(f"train.gradient_accumulation_steps: must be >= 1, got {train.gradient_accumulation_steps}")
    if train.global_batch_size is not None and train.global_batch_size < 1:
        problems.append(f"train.global_batch_size: must be >= 1, got {train.global_batch_size}")
    if (train.max_steps is None) == (train.epochs is None):
        problems.append("train.max_steps / train.epochs: set exactly one")
    if train.max_steps is not None and train.max_steps < 1:
        problems.append(f"train.max_steps: must be >= 1, got {train.max_steps}")
    if train.epochs is not None and train.epochs <= 0:
        problems.append(f"train.epochs: must be > 0, got {train.epochs}")
    if train.lr <= 0:
        problems.append(f"train.lr: must be > 0, got {train.lr}")
    if not 0.0 <= train.min_lr_ratio <= 1.0:
        problems.append(f"train.min_lr_ratio: must be in [0, 1], got {train.min_lr_ratio}")
    if train.warmup_steps < 0:
        problems.append(f"train.warmup_steps: must be >= 0, got {train.warmup_steps}")
    if train.max_steps is not None and train.warmup_steps > train.max_steps:
        problems.append(f"train.warmup_steps: {train.warmup_steps} exceeds train.max_steps {train.max_steps}")
    if train.max_grad_norm < 0:
        problems.append(f"train.max_grad_norm: must be >= 0 (0 disables), got {train.max_grad_norm}")
    if len(train.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in train.adam_betas):
        problems.append(f"train.adam_betas: expected two numbers in [0, 1), got {train.adam_betas}")
    if train.optimizer in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit") and strategy == "full":
        problems.append(
            f"train.optimizer: {train.optimizer} is for strategy lora/qlora; full fine-tuning under ZeRO "
            "uses adamw_torch or adamw_deepspeed"
        )
    return problems


def _validate_deepspeed(ds: DeepSpeedConfig, strategy: str) -> list[str]:
    problems = []
    if ds.stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.stage: must be 0, 1, 2 or 3, got {ds.stage}")
    if ds.offload_param.device != "none" and ds.stage != 3:
        problems.append(f"deepspeed.offload_param.device: parameter offload needs deepspeed.stage 3, got {ds.stage}")
    if ds.offload_optimizer.device != "none" and ds.stage == 0:
        problems.append("deepspeed.offload_optimizer.device: optimizer offload needs deepspeed.stage >= 1")
    for name in ("offload_optimizer", "offload_param"):
        off: OffloadConfig = getattr(ds, name)
        if off.device == "nvme" and not off.nvme_path:
            problems.append(f"deepspeed.{name}.nvme_path: required when deepspeed.{name}.device is nvme")
        if off.device != "nvme" and off.nvme_path:
            problems.append(f"deepspeed.{name}.nvme_path: only used with device nvme (device is {off.device})")
    if strategy == "qlora" and ds.offload_param.device != "none":
        problems.append("deepspeed.offload_param.device: a 4-bit base cannot be offloaded; use none with qlora")
    for name in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters"):
        if getattr(ds, name) < 1:
            problems.append(f"deepspeed.{name}: must be >= 1")
    if ds.stage3_param_persistence_threshold < 0:
        problems.append("deepspeed.stage3_param_persistence_threshold: must be >= 0")
    if ds.timeout_minutes < 1:
        problems.append("deepspeed.timeout_minutes: must be >= 1")
    return problems


def _validate_lora(cfg: Config) -> list[str]:
    if cfg.strategy == "full":
        return []
    lora, problems = cfg.lora, []
    if lora.r <= 0:
        problems.append(f"lora.r: must be > 0, got {lora.r}")
    if lora.alpha <= 0:
        problems.append(f"lora.alpha: must be > 0, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        problems.append(f"lora.dropout: must be in [0, 1), got {lora.dropout}")
    if isinstance(lora.target_modules, str) and lora.target_modules != "all-linear":
        problems.append(f"lora.target_modules: a list of module names or 'all-linear', got {lora.target_modules!r}")
    if isinstance(lora.target_modules, list) and not lora.target_modules:
        problems.append("lora.target_modules: must not be empty")
    return problems


def _validate_checkpoint(ckpt: CheckpointConfig, ev: EvalConfig, log: LoggingConfig) -> list[str]:
    problems = []
    if ckpt.every_steps < 1:
        problems.append(f"checkpoint.every_steps: must be >= 1, got {ckpt.every_steps}")
    if ckpt.keep_last < 0:
        problems.append(f"checkpoint.keep_last: must be >= 0 (0 keeps all), got {ckpt.keep_last}")
    if not ckpt.resume:
        problems.append("checkpoint.resume: auto, never, or a checkpoint path")
    elif ckpt.resume not in ("auto", "never") and not Path(ckpt.resume).is_dir():
        problems.append(f"checkpoint.resume: {ckpt.resume} is neither auto, never, nor an existing checkpoint folder")
    if ev.every_steps < 0:
        problems.append(f"eval.every_steps: must be >= 0, got {ev.every_steps}")
    if ev.max_batches is not None and ev.max_batches < 1:
        problems.append(f"eval.max_batches: must be >= 1, got {ev.max_batches}")
    if log.every_steps < 1:
        problems.append(f"logging.every_steps: must be >= 1, got {log.every_steps}")
    return problems


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------
# The reference in README.md is generated from the field docstrings above: `python -m dtrain.config`.


def reference_markdown() -> str:
    """One table row per config key: dotted key, default, meaning (the docstring under the field)."""
    import ast
    import inspect

    docs: dict[tuple[str, str], str] = {}
    for node in ast.parse(inspect.getsource(inspect.getmodule(Config))).body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            for field_node, doc in zip(body, body[1:], strict=False):
                if isinstance(field_node, ast.AnnAssign) and isinstance(doc, ast.Expr):
                    docs[(node.name, field_node.target.id)] = " ".join(str(doc.value.value).split())
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
                continue
            if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
                default = []
            if isinstance(default, str):
                shown = json.dumps(default)
            else:
                shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            rows.append(f"| `{prefix}{f.name}` | `{shown}` | {docs.get((cls.__name__, f.name), '')} |")

    walk(Config, "")
    dataset_rows = ["", "Each entry of `data.datasets` / `data.eval_datasets`:", "", rows[0], rows[1]]
    rows_before = len(rows)
    walk(DatasetConfig, "")
    dataset_rows += rows[rows_before:]
    return "\n".join(rows[:rows_before] + dataset_rows) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
