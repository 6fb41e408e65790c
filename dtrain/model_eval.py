"""`dtrain eval`: loss and perplexity of a trained model and of its base on any data, in one table. One process on
one device (the GPU if there is one, else the CPU), no process group and no DeepSpeed engine.

What is evaluated (`source`):
- a run's checkpoint (a run's output_dir, its checkpoints folder, its config YAML, or a checkpoint; `checkpoint`
  picks one, default the newest): the strategy rebuilds the model as training computed with it, and the base as
  training saw it at step 0 (for qlora: the 4-bit base);
- an exported adapter folder (adapter_config.json): peft loads it onto the base it names;
- an exported model folder (config.json, from `dtrain export --hf / --merged`): transformers loads it; it records
  no base, so the base columns need `base`.

The data: a run config YAML (its eval split, prepared as the trainer prepares it and read from the same cache, and
its eval.retention sets), or one dataset (anything a data.datasets entry reads). The loss is dtrain.evaluation's:
the trainer's own eval computation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dtrain import strategies
from dtrain.config import Config, ConfigError, DatasetConfig, load_config

Loader = Callable[[torch.device], torch.nn.Module]


@dataclass
class Subject:
    """A model to evaluate and its base, found and checked without loading any weights."""

    label: str
    cfg: Config
    """Its tokenizer (model / tokenizer_path), and for a run: the data settings and batch size it trained with."""
    load: Loader
    base_label: str | None
    load_base: Loader | None


@dataclass
class Row:
    name: str
    label_tokens: int
    loss: float
    base_loss: float | None


def find_subject(source: str, checkpoint: str | None, base: str | None) -> Subject:
    """What `source` names; ExportError / ConfigError / HubError for anything missing, before any weight is read."""
    folder = Path(source)
    if (folder / "adapter_config.json").is_file():
        return _adapter_subject(folder, base)
    if (folder / "config.json").is_file():
        return _model_subject(folder, base)
    from dtrain.export import find_checkpoint, run_config

    found = find_checkpoint(source, checkpoint)
    cfg = run_config(found, base)
    strategy = strategies.get(cfg.strategy)
    return Subject(
        f"{found} ({cfg.strategy})",
        cfg,
        lambda device: strategy.eval_model(cfg, found, device),
        cfg.model.path,
        lambda device: strategy.eval_model(cfg, None, device),
    )


def _adapter_subject(folder: Path, base: str | None) -> Subject:
    base = base or json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError([f"--base: {folder}/adapter_config.json names no base model; give --base PATH"])
    cfg = _model_config(base, tokenizer=folder)

    def load(device: torch.device) -> torch.nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(_plain_model(cfg.model.local_dir(), device), str(folder)).eval()

    return Subject(f"{folder} (adapter)", cfg, load, base, lambda device: _plain_model(cfg.model.local_dir(), device))


def _model_subject(folder: Path, base: str | None) -> Subject:
    cfg = _model_config(str(folder), tokenizer=folder)
    base_cfg = _model_config(base, tokenizer=folder) if base else None
    load_base = (lambda device: _plain_model(base_cfg.model.local_dir(), device)) if base_cfg else None
    return Subject(str(folder), cfg, lambda device: _plain_model(folder, device), base, load_base)


def _model_config(model_path: str, tokenizer: Path) -> Config:
    cfg = Config()
    cfg.model.path, cfg.model.tokenizer_path = model_path, str(tokenizer)
    if not (cfg.model.local_dir() / "config.json").is_file():  # a repo id not in the cache raises HubError here
        raise ConfigError([f"--base: {model_path} is no model folder (no config.json)"])
    return cfg


def _plain_model(path: Path | str, device: torch.device) -> torch.nn.Module:
    """A model folder as transformers loads it by default, in the dtype it was saved in."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype="auto").to(device).eval()


def data_config(data: str, fmt: str, subject: Subject) -> Config:
    """The config whose data section (and eval.retention) says what to evaluate on; ConfigError naming the problem.

    A YAML file is a run config, checked as `dtrain check` checks it; anything else is one dataset, read with the
    data settings (seq_len, packing, chat template) and batch size of the subject's run (defaults for an export)."""
    if Path(data).suffix in (".yaml", ".yml"):
        try:
            return load_config(data)
        except ConfigError as e:
            raise ConfigError([f"--data {data}: {p}" for p in e.problems]) from None
    dataset = DatasetConfig(path=data, format=fmt)
    problems = dataset.problems("--data", check_paths=True)
    if problems:
        raise ConfigError([p.replace("--data.path:", "--data:") for p in problems])
    return Config(data=replace(subject.cfg.data, datasets=[dataset], eval_datasets=[]), train=subject.cfg.train)


def eval_sets(data_cfg: Config, data: str, tokenizer: Any) -> dict[str, Any]:
    """Name -> Samples: the eval split and retention sets of a run config, or the one dataset."""
    from dtrain.data import prepare_data
    from dtrain.data.prepare import resolve_chat_template, tokenized_samples

    if Path(data).suffix not in (".yaml", ".yml"):
        template = resolve_chat_template(data_cfg, tokenizer)
        samples, _, _ = tokenized_samples(data_cfg.data.datasets[0], data_cfg.data, tokenizer, template)
        return {data: samples}
    prepared = prepare_data(data_cfg, tokenizer, rank=0, world_size=1)
    sets = {"eval": prepared.eval} if prepared.eval is not None and len(prepared.eval) else {}
    sets.update(prepared.retention)
    if not sets:
        raise ConfigError([f"--data {data}: no eval data (data.eval_datasets, data.eval_fraction, eval.retention)"])
    return sets


def evaluate_subject(
    subject: Subject, data_cfg: Config, sets: dict[str, Any], tokenizer: Any, device: torch.device
) -> list[Row]:
    """Every set on the model, then on its base (one model in memory at a time)."""
    losses = _losses(subject.load(device), data_cfg, sets, tokenizer, device)
    base = _losses(subject.load_base(device), data_cfg, sets, tokenizer, device) if subject.load_base else {}
    return [Row(name, s.total_label_tokens, losses[name], base.get(name)) for name, s in sets.items()]


def _losses(model: torch.nn.Module, cfg: Config, sets: dict[str, Any], tokenizer: Any, device: torch.device):
    from dtrain.attention import VARLEN_KERNELS
    from dtrain.data import Batcher
    from dtrain.evaluation import eval_batches, token_mean_loss
    from dtrain.loss import install_chunked_loss

    micro, data = cfg.train.micro_batch_size, cfg.data
    install_chunked_loss(model, micro * data.seq_len)  # the forward the trainer evaluates with

    varlen = model.config._attn_implementation in VARLEN_KERNELS  # the kernel the model was loaded with
    to_batch = Batcher(tokenizer.pad_token_id, data.seq_len, data.packing, varlen, device)

    losses = {}
    for name, samples in sets.items():
        losses[name] = token_mean_loss(model, samples, eval_batches(len(samples), 0, 1, micro), to_batch, device)
    del model
    return losses


def table(subject: Subject, rows: list[Row]) -> str:
    """The printed result: model and base, then per data set tokens, loss, perplexity, and the change from the base."""
    lines = [f"model  {subject.label}", f"base   {subject.base_label or '(not known: give --base PATH)'}", ""]
    width = max(len("data"), *(len(r.name) for r in rows))
    header = f"{'data':<{width}}  {'tokens':>10}  {'loss':>8}  {'ppl':>10}"
    if subject.load_base:
        header += f"  {'base loss':>9}  {'base ppl':>10}  {'change':>8}"
    lines.append(header)
    for r in rows:
        line = f"{r.name:<{width}}  {r.label_tokens:>10,}  {r.loss:>8.4f}  {_ppl(r.loss):>10.2f}"
        if r.base_loss is not None:
            line += f"  {r.base_loss:>9.4f}  {_ppl(r.base_loss):>10.2f}  {r.loss - r.base_loss:>+8.4f}"
        lines.append(line)
    return "\n".join(lines)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709
