"""Config sections of the training data: the datasets, their formats and field names, packing, eval split."""

from __future__ import annotations

import glob
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
"""Suffix of a data file -> the `datasets` builder that reads it."""
DATA_SUFFIXES = tuple(DATA_FILE_BUILDERS)
CHAT_ROLES = ("system", "user", "assistant", "tool")
GLOB_CHARS = frozenset("*?[")


def source_kind(path: str) -> Literal["file", "glob", "folder", "hub"] | None:
    """What a dataset path names (a save_to_disk folder is a folder here); None: nothing dtrain can read."""
    from dtrain.hub import is_hub_id

    if GLOB_CHARS & set(path):
        return "glob"
    if Path(path).suffix in DATA_SUFFIXES:
        return "file"
    if Path(path).is_dir():
        return "folder"
    return "hub" if is_hub_id(path) else None


@dataclass
class DatasetConfig:
    path: str = ""
    """A local .jsonl / .json / .parquet / .csv / .arrow file (errors name file:line); a glob of such files; a local
    folder `datasets.load_dataset` reads, or one written by `save_to_disk`; or a Hub dataset id (org/name), read
    from the Hugging Face cache (downloaded by check / prepare / submit where there is network)."""
    name: str | None = None
    """Dataset configuration name (a Hub dataset or folder with several configs)."""
    split: str = "train"
    """Split to read (folders, globs, save_to_disk folders, Hub datasets)."""
    revision: str | None = None
    """Hub dataset branch, tag or commit; default the main branch."""
    data_files: list[str] | str | None = None
    """Files or patterns inside a folder or Hub dataset, as `datasets.load_dataset(data_files=...)` takes them."""
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
    """Maps roles in the file to system/user/assistant/tool, e.g. {human: user, gpt: assistant} (those two sharegpt
    names are understood without a map)."""
    tools_field: str = "tools"
    """Field holding the row's tool definitions (format: chat), passed to the chat template as `tools`."""
    roles_to_train: list[str] = field(default_factory=lambda: ["assistant"])
    """Messages of these roles are trained (format: chat); the others are context."""

    def problems(self, key: str, check_paths: bool) -> list[str]:
        problems = [] if self.path else [f"{key}.path: required"]
        kind = source_kind(self.path) if self.path else "file"
        if kind is None:
            problems.append(
                f"{key}.path: {self.path}: unsupported file type (use {', '.join(DATA_SUFFIXES)}), and not a glob, "
                "folder or Hub dataset id (org/name)"
            )
        elif kind == "file" and check_paths and self.path and not Path(self.path).is_file():
            problems.append(f"{key}.path: {self.path} does not exist")
        elif kind == "glob" and check_paths and not glob.glob(self.path, recursive=True):
            problems.append(f"{key}.path: {self.path} matches no files")
        if kind == "file" and (self.name or self.split != "train" or self.data_files):
            problems.append(f"{key}: name / split / data_files are for folders, globs and Hub datasets, not a file")
        if self.revision and kind != "hub":
            problems.append(f"{key}.revision: only for Hub dataset ids")
        if self.weight <= 0:
            problems.append(f"{key}.weight: must be > 0, got {self.weight}")
        roles = f"{', '.join(CHAT_ROLES[:-1])} or {CHAT_ROLES[-1]}"
        for role, target in self.role_map.items():
            if target not in CHAT_ROLES:
                problems.append(f"{key}.role_map.{role}: must map to {roles}")
        if not self.roles_to_train or any(role not in CHAT_ROLES for role in self.roles_to_train):
            problems.append(f"{key}.roles_to_train: one or more of {roles}, got {self.roles_to_train}")
        return problems


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
    num_proc: int | None = None
    """Processes tokenizing the data (by `dtrain prepare`, or by rank 0 of a run when the cache misses); default the
    cores available to that process. Any value gives the same samples (same order, same packing)."""

    def problems(self, check_paths: bool) -> list[str]:
        problems = [] if self.datasets else ["data.datasets: at least one training dataset is required"]
        for section, datasets in (("datasets", self.datasets), ("eval_datasets", self.eval_datasets)):
            for i, ds in enumerate(datasets):
                problems += ds.problems(f"data.{section}[{i}]", check_paths)
                if self.overlong == "split" and ds.format != "text":
                    problems.append(
                        f"data.overlong: split applies to format text only; data.{section}[{i}] is {ds.format}"
                    )
        if self.num_proc is not None and self.num_proc < 1:
            problems.append(f"data.num_proc: must be >= 1, got {self.num_proc}")
        if self.seq_len < 8:
            problems.append(f"data.seq_len: must be >= 8, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            problems.append(f"data.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if any(ds.format == "instruction" for ds in self.datasets + self.eval_datasets):
            problems += [f"data.instruction_template: {p}" for p in _format_string_problems(self.instruction_template)]
        if self.chat_template is not None and not self.chat_template.strip():
            problems.append("data.chat_template: empty; remove it to use the tokenizer's template")
        if self.group_by_length and self.packing:
            problems.append("data.group_by_length: only with data.packing false (packed blocks are all seq_len long)")
        return problems


def _format_string_problems(template: str) -> list[str]:
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
