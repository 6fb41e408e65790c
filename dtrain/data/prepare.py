"""Sources (dtrain.data.sources) -> tokenized examples -> eval split -> mixture -> packed `Samples`, cached on disk.

    prepared = prepare_data(cfg, tokenizer, rank=rank, world_size=world_size)
    prepared.train[i]  # {"input_ids", "labels", "position_ids"}, at most seq_len tokens, unpadded

Eval split: with `data.eval_datasets` those files are the eval data; otherwise, with `data.eval_fraction` > 0,
round(fraction x examples) of each training dataset's examples are held out, chosen by a seeded permutation
(train.seed, dataset index) before the mixture and before packing, so no eval example is ever trained on.

Mixture: each training dataset gets round(N x weight_i / sum of weights) examples, where N is the total number of
training examples of all datasets: whole copies of the dataset, plus a seeded random subset for the fraction. So
weights are shares of examples (not tokens) and the epoch keeps its natural size; a single dataset is used as is.
With several datasets, default (equal) weights give them equal shares: the report shows how many examples of each
were used. The result is fixed at preparation: `Samples` already reflects the mixture, the trainer only orders it.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dtrain.build_once import BuildFailed, build_once
from dtrain.data.cache import DONE_FILE, cache_key, is_complete
from dtrain.data.chat import chat_example, training_chat_template
from dtrain.data.errors import DataError, RowError
from dtrain.data.formats import IGNORE, Example, instruction_example, text_example
from dtrain.data.packing import best_fit_decreasing
from dtrain.data.parallel import default_num_proc, ordered_map
from dtrain.data.report import DatasetReport, PrepareReport, SplitReport
from dtrain.data.samples import Samples
from dtrain.data.sources import read_source, resolve_source


@dataclass
class PreparedData:
    train: Samples
    eval: Samples | None
    report: PrepareReport
    retention: dict[str, Samples] = field(default_factory=dict)
    """eval.retention's datasets by name: never trained on, evaluated on their own."""


def prepare_data(cfg, tokenizer, *, rank: int, world_size: int) -> PreparedData:
    """Tokenize and pack once (rank 0, cached on disk); every rank then loads the cache memory-mapped.

    world_size is accepted for symmetry with the trainer; the split across ranks is the trainer's (global order).
    """
    folder = cfg.cache_dir / cache_key(cfg, tokenizer)
    try:
        hit = build_once(
            folder,
            lambda tmp: write_prepared(tmp, folder, build_prepared(cfg, tokenizer)),
            is_builder=rank == 0,
            is_complete=is_complete,
        )
    except BuildFailed as e:
        raise DataError(f"rank 0 failed to prepare the data: {e}") from e
    prepared = load_prepared(folder)
    prepared.report.cache_hit = hit
    return prepared


def prepare_command(cfg) -> str:
    """`dtrain prepare CFG`: prepare ahead of time (e.g. on a login node) and return the report text."""
    tokenizer = cfg.model.load_tokenizer()
    return str(prepare_data(cfg, tokenizer, rank=0, world_size=1).report)


def write_prepared(folder: Path, final: Path, prepared: PreparedData) -> None:
    """Into `folder`, which is renamed to `final` once complete."""
    prepared.train.save(folder, "train")
    if prepared.eval is not None:
        prepared.eval.save(folder, "eval")
    for index, samples in enumerate(prepared.retention.values()):  # by position: names need not be file names
        samples.save(folder, f"retention-{index}")
    prepared.report.cache_path = str(final)
    (folder / DONE_FILE).write_text(json.dumps(prepared.report.to_dict(), indent=1))  # last: marks it complete


def load_prepared(folder: Path) -> PreparedData:
    report = PrepareReport.from_dict(json.loads((folder / DONE_FILE).read_text()))
    eval_samples = Samples.load(folder, "eval") if report.eval is not None else None
    retention = {name: Samples.load(folder, f"retention-{i}") for i, name in enumerate(report.retention)}
    return PreparedData(Samples.load(folder, "train"), eval_samples, report, retention)


def build_prepared(cfg, tokenizer) -> PreparedData:
    started = time.time()
    data, seed = cfg.data, cfg.train.seed
    report = PrepareReport(seq_len=data.seq_len, packing=data.packing)
    chat_template = resolve_chat_template(cfg, tokenizer)
    train_sets = []
    for ds in data.datasets:
        examples, ds_report = tokenize_dataset(ds, data, tokenizer, chat_template)
        train_sets.append(examples)
        report.datasets.append(ds_report)
    eval_examples: list[Example] = []
    if data.eval_datasets:
        for ds in data.eval_datasets:
            examples, ds_report = tokenize_dataset(ds, data, tokenizer, chat_template)
            ds_report.eval_examples = len(examples)
            eval_examples += examples
            report.eval_datasets.append(ds_report)
    elif data.eval_fraction > 0:
        for index, ds_report in enumerate(report.datasets):
            train_sets[index], held_out = split_eval(train_sets[index], data.eval_fraction, seed, index)
            ds_report.eval_examples = len(held_out)
            eval_examples += held_out
    train_examples = mix(train_sets, [ds.weight for ds in data.datasets], seed, report.datasets)
    train = to_samples(train_examples, data.seq_len, data.packing)
    report.train = split_report(train, len(train_examples), data.seq_len)
    eval_samples = to_samples(eval_examples, data.seq_len, data.packing) if eval_examples else None
    if eval_samples is not None:
        report.eval = split_report(eval_samples, len(eval_examples), data.seq_len)
    retention = {}
    for name, ds in cfg.eval.retention.items():
        retention[name], _, report.retention[name] = tokenized_samples(ds, data, tokenizer, chat_template)
    report.seconds = time.time() - started
    return PreparedData(train, eval_samples, report, retention)


def tokenized_samples(ds, data, tokenizer, chat_template: str | None) -> tuple[Samples, DatasetReport, SplitReport]:
    """One dataset on its own, tokenized and packed as data.* says (retention sets, `dtrain eval --data FILE`)."""
    examples, ds_report = tokenize_dataset(ds, data, tokenizer, chat_template)
    if not examples:
        raise DataError(f"{ds.path}: no usable examples (see the skipped/dropped counts)")
    samples = to_samples(examples, data.seq_len, data.packing)
    return samples, ds_report, split_report(samples, len(examples), data.seq_len)


def resolve_chat_template(cfg, tokenizer) -> str | None:
    """The template for chat datasets (None without any); a chat dataset with no template is a clear error."""
    if not any(ds.format == "chat" for _, ds in cfg.dataset_entries()):
        return None
    template = training_chat_template(cfg, tokenizer)
    if not template:
        raise DataError(
            f"tokenizer {cfg.tokenizer_path or '(given)'} has no chat template, and format: chat needs one: "
            "set data.chat_template to a Jinja template (see dtrain.tiny.CHAT_TEMPLATE for ChatML)"
        )
    return template


def tokenize_dataset(ds, data, tokenizer, chat_template: str | None) -> tuple[list[Example], DatasetReport]:
    report = DatasetReport(path=str(ds.path), format=ds.format, weight=ds.weight)
    examples, skipped, dropped = [], Counter(), Counter()
    rows = read_source(resolve_source(ds), ds)
    row_fn = functools.partial(tokenize_row, ds=ds, data=data, tokenizer=tokenizer, chat_template=chat_template)
    num_proc = data.num_proc or default_num_proc()
    for where, outcome in ordered_map(row_fn, rows, num_proc):
        report.rows += 1
        if isinstance(outcome, RowError):
            if data.on_bad_row == "error":
                raise DataError(f"{where}: {outcome.detail}  (set data.on_bad_row: skip to skip such rows)")
            skipped[outcome.reason] += 1
            report.first_skipped.setdefault(outcome.reason, f"{where}: {outcome.detail}")
            continue
        fitted, action = outcome
        if action == "dropped":
            dropped["longer than seq_len"] += 1
            continue
        if action:  # truncated or split
            setattr(report, action, getattr(report, action) + 1)
        if not fitted:
            dropped["nothing to train on" + (" after truncation" if action else "")] += 1
            continue
        examples += fitted
    report.examples, report.skipped, report.dropped = len(examples), dict(skipped), dict(dropped)
    return examples, report


def tokenize_row(row, *, ds, data, tokenizer, chat_template: str | None):
    """One row -> (examples to keep, what fit_to_seq_len did), or the RowError; runs in a tokenizing process."""
    if isinstance(row, RowError):
        return row
    try:
        example = make_row_example(row, ds, data, tokenizer, chat_template)
    except RowError as e:
        return e
    return fit_to_seq_len(example, data.seq_len, data.overlong)


def fit_to_seq_len(example: Example, seq_len: int, overlong: str) -> tuple[list[Example], str | None]:
    """The example(s) to keep, and what was done: None, "truncated", "split" or "dropped" (a report counter).

    An example that ends up with no trained token (e.g. a chat whose only reply was cut off) is not kept.
    """
    action = None
    pieces = [example]
    if len(example) > seq_len:
        if overlong == "drop":
            return [], "dropped"
        if overlong == "truncate":
            action, pieces = "truncated", [Example(example.input_ids[:seq_len], example.labels[:seq_len])]
        else:
            action, pieces = "split", [_chunk(example, a, a + seq_len) for a in range(0, len(example), seq_len)]
    return [p for p in pieces if p.num_label_tokens > 0], action


def _chunk(example: Example, start: int, end: int) -> Example:
    labels = example.labels[start:end].copy()
    labels[0] = IGNORE  # a chunk is a document of its own: nothing predicts its first token
    return Example(example.input_ids[start:end], labels)


def make_row_example(row, ds, data, tokenizer, chat_template: str | None) -> Example:
    if ds.format == "text":
        return text_example(row, ds, tokenizer)
    if ds.format == "instruction":
        return instruction_example(row, ds, tokenizer, data.instruction_template)
    return chat_example(row, ds, tokenizer, chat_template)


def split_eval(examples: list[Example], fraction: float, seed: int, index: int):
    """(train, held_out): round(fraction x n) examples held out by a permutation seeded by (seed, index)."""
    n_eval = int(round(fraction * len(examples)))
    chosen = set(np.random.default_rng([seed, index, 0xE7A1]).permutation(len(examples))[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in chosen]
    held_out = [e for i, e in enumerate(examples) if i in chosen]
    return train, held_out


def mix(sets: list[list[Example]], weights: list[float], seed: int, reports: list[DatasetReport]) -> list[Example]:
    """Resample each dataset to its share of the total (see the module docstring)."""
    total, weight_sum = sum(len(s) for s in sets), sum(weights)
    out: list[Example] = []
    for index, (examples, weight, report) in enumerate(zip(sets, weights, reports, strict=True)):
        target = len(examples) if len(sets) == 1 else int(round(total * weight / weight_sum))
        if not examples:
            raise DataError(f"{report.path}: no usable training examples (see the skipped/dropped counts)")
        copies, extra = divmod(target, len(examples))
        subset = np.sort(np.random.default_rng([seed, index, 0x313C]).permutation(len(examples))[:extra])
        out += examples * copies + [examples[i] for i in subset.tolist()]
        report.train_examples = target
    return out


def to_samples(examples: list[Example], seq_len: int, packing: bool) -> Samples:
    if packing:
        groups = best_fit_decreasing([len(e) for e in examples], seq_len)
    else:
        groups = [[i] for i in range(len(examples))]
    return Samples.from_groups(examples, groups)


def split_report(samples: Samples, examples: int, seq_len: int) -> SplitReport:
    tokens = samples.num_tokens
    fill = tokens / (len(samples) * seq_len) if len(samples) else 0.0
    return SplitReport(examples, len(samples), tokens, samples.total_label_tokens, round(fill, 6))
