"""`dtrain eval`: loss and perplexity of a trained model and of its base on any data, in one table. One process on
one device (the GPU if there is one, else the CPU), no process group and no DeepSpeed engine.

What is evaluated (`source`):
- a run's checkpoint (a run's output_dir, its checkpoints folder, its config YAML, or a checkpoint; `checkpoint`
  picks one, default the newest): the strategy rebuilds the model as training computed with it, and the base as
  training saw it at step 0 (for qlora: the 4-bit base);
- an exported adapter folder (adapter_config.json): peft loads it onto the base it names;
- an exported model folder (config.json, from `dtrain export --hf / --merged`): transformers loads it; it records
  no base, so the base columns need `base`.

The data (`EvalData`): by default, for a run, what its checkpoint's config.yaml (the resolved config it trained with,
command-line overrides included) says; else a run config YAML; either is its eval split, prepared as the trainer
prepares it and read from the same cache, and its eval.retention sets, capped by eval.max_batches as the trainer
capped them on the run's number of ranks. Or one dataset (anything a data.datasets entry reads), evaluated whole.
`key=value` overrides apply to whichever config that is. The loss is dtrain.evaluation's: the trainer's own eval
computation over the same blocks.
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
from dtrain.config import Config, ConfigError, DatasetConfig, apply_override, config_from_dict, load_config, read_yaml
from dtrain.config.typed import convert

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
    checkpoint: Path | None = None
    """A run's checkpoint: its config.yaml is what is evaluated by default."""
    world_size: int = 1
    """The ranks the run last trained (and evaluated) on: eval.max_batches is per rank."""


@dataclass
class EvalData:
    cfg: Config
    """Data settings, micro batch and eval.max_batches."""
    source: str
    """Where they come from, as printed."""
    dataset: str | None
    """The one dataset evaluated, or None for a run config's eval split and retention sets."""
    world_size: int


@dataclass
class Row:
    name: str
    blocks: int
    """Samples (packed blocks, or examples with packing off) evaluated, of `total_blocks`."""
    total_blocks: int
    label_tokens: int
    """Trained tokens in the evaluated blocks: what the loss is the mean over."""
    loss: float
    base_loss: float | None


def find_subject(source: str, checkpoint: str | None, base: str | None) -> Subject:
    """What `source` names; ExportError / ConfigError / HubError for anything missing, before any weight is read."""
    folder = Path(source)
    if (folder / "adapter_config.json").is_file():
        return _adapter_subject(folder, base)
    if (folder / "config.json").is_file():
        return _model_subject(folder, base)
    from dtrain.checkpoint_layout import read_progress
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
        found,
        read_progress(found).world_size or 1,
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


def eval_data(data: str | None, fmt: str, subject: Subject, overrides: list[str]) -> EvalData:
    """What to evaluate on and how; ConfigError naming the problem.

    No `data`: the run's own resolved config (its checkpoint's config.yaml). A YAML file: a run config, checked as
    `dtrain check` checks it. Anything else: one dataset, read with the data settings (seq_len, packing, chat
    template) and batch size of the subject's run (defaults for an export). `overrides` apply to that config."""
    if data is None:
        if subject.checkpoint is None:
            raise ConfigError([f"--data: required for {subject.label}: an exported model records no run config"])
        source = subject.checkpoint / "config.yaml"
        cfg = config_from_dict(read_yaml(source), overrides, str(source), check_paths=False)
        return EvalData(cfg, f"the run's config ({source})", None, subject.world_size)
    if Path(data).suffix in (".yaml", ".yml"):
        try:
            return EvalData(load_config(data, overrides), data, None, subject.world_size)
        except ConfigError as e:
            raise ConfigError([f"--data {data}: {p}" for p in e.problems]) from None
    dataset = DatasetConfig(path=data, format=fmt)
    problems = dataset.problems("--data", check_paths=True)
    if problems:
        raise ConfigError([p.replace("--data.path:", "--data:") for p in problems])
    cfg = Config(data=replace(subject.cfg.data, datasets=[dataset], eval_datasets=[]), train=subject.cfg.train)
    return EvalData(_overridden(cfg, overrides), data, data, 1)


def _overridden(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` (not a whole run config: no output_dir or schedule) with `overrides`, checked where eval reads it."""
    if not overrides:
        return cfg
    raw, problems = cfg.to_dict(), []
    for item in overrides:
        problems += apply_override(raw, item)
    out = convert(Config, raw, "", problems)
    problems += out.data.problems(check_paths=True) + out.eval.problems()
    problems += [p for p in out.train.problems() if p.startswith("train.micro_batch_size")]  # the one train key read
    if problems:
        raise ConfigError(problems)
    return out


def eval_sets(plan: EvalData, tokenizer: Any) -> dict[str, Any]:
    """Name -> Samples: the eval split and retention sets of a run config, or the one dataset."""
    from dtrain.data import prepare_data
    from dtrain.data.prepare import resolve_chat_template, tokenized_samples

    if plan.dataset is not None:
        template = resolve_chat_template(plan.cfg, tokenizer)
        samples, _, _ = tokenized_samples(plan.cfg.data.datasets[0], plan.cfg.data, tokenizer, template)
        return {plan.dataset: samples}
    prepared = prepare_data(plan.cfg, tokenizer, rank=0, world_size=1)
    sets = {"eval": prepared.eval} if prepared.eval is not None and len(prepared.eval) else {}
    sets.update(prepared.retention)
    if not sets:
        raise ConfigError([f"{plan.source}: no eval data (data.eval_datasets, data.eval_fraction, eval.retention)"])
    return sets


def evaluate_subject(subject: Subject, plan: EvalData, sets: dict[str, Any], tokenizer: Any,
                     device: torch.device) -> list[Row]:  # fmt: skip
    """Every set on the model, then on its base (one model in memory at a time), over the blocks the run's trainer
    evaluated: eval.max_batches per rank on its ranks."""
    from dtrain.evaluation import one_process_batches

    micro, cap = plan.cfg.train.micro_batch_size, plan.cfg.eval.max_batches
    batches = {name: one_process_batches(len(s), micro, cap, plan.world_size) for name, s in sets.items()}
    losses = _losses(subject.load(device), plan.cfg, sets, batches, tokenizer, device)
    base = _losses(subject.load_base(device), plan.cfg, sets, batches, tokenizer, device) if subject.load_base else {}
    rows = []
    for name, samples in sets.items():
        evaluated = [i for batch in batches[name] for i in batch]
        tokens = sum(samples.num_label_tokens(i) for i in evaluated)
        rows.append(Row(name, len(evaluated), len(samples), tokens, losses[name], base.get(name)))
    return rows


def _losses(model: torch.nn.Module, cfg: Config, sets: dict[str, Any], batches: dict[str, list[list[int]]],
            tokenizer: Any, device: torch.device) -> dict[str, float]:  # fmt: skip
    from dtrain.attention import VARLEN_KERNELS
    from dtrain.data import Batcher
    from dtrain.evaluation import token_mean_loss
    from dtrain.loss import install_chunked_loss

    micro, data = cfg.train.micro_batch_size, cfg.data
    install_chunked_loss(model, micro * data.seq_len)  # the forward the trainer evaluates with

    varlen = model.config._attn_implementation in VARLEN_KERNELS  # the kernel the model was loaded with
    to_batch = Batcher(tokenizer.pad_token_id, data.seq_len, data.packing, varlen, device)

    losses = {name: token_mean_loss(model, samples, batches[name], to_batch, device) for name, samples in sets.items()}
    del model
    return losses


def table(subject: Subject, plan: EvalData, rows: list[Row]) -> str:
    """The printed result: model, base, what was evaluated, then per data set blocks, tokens, loss, perplexity, and
    the change from the base."""
    cfg = plan.cfg
    cap = "every block (eval.max_batches null)"
    if cfg.eval.max_batches:
        cap = f"eval.max_batches {cfg.eval.max_batches} per rank x {plan.world_size} rank(s)"
    lines = [
        f"model  {subject.label}",
        f"base   {subject.base_label or '(not known: give --base PATH)'}",
        f"data   {plan.source}: seq_len {cfg.data.seq_len}, packing {str(cfg.data.packing).lower()}, micro batch "
        f"{cfg.train.micro_batch_size}, {cap}",
        "",
    ]
    width = max(len("data"), *(len(r.name) for r in rows))
    header = f"{'data':<{width}}  {'blocks':>11}  {'tokens':>10}  {'loss':>8}  {'ppl':>10}"
    if subject.load_base:
        header += f"  {'base loss':>9}  {'base ppl':>10}  {'change':>8}"
    lines.append(header)
    for r in rows:
        blocks = f"{r.blocks}/{r.total_blocks}"
        line = f"{r.name:<{width}}  {blocks:>11}  {r.label_tokens:>10,}  {r.loss:>8.4f}  {_ppl(r.loss):>10.2f}"
        if r.base_loss is not None:
            line += f"  {r.base_loss:>9.4f}  {_ppl(r.base_loss):>10.2f}  {r.loss - r.base_loss:>+8.4f}"
        lines.append(line)
    return "\n".join(lines)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709
