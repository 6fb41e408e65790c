"""What preparation did, in numbers a user can check: `print(report)` or `dtrain prepare CFG`."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DatasetReport:
    path: str
    format: str
    rows: int = 0
    """Rows read from the file (including skipped ones)."""
    examples: int = 0
    """Examples kept after skipping bad rows and dropping over-long ones."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Bad rows skipped (on_bad_row: skip), by reason."""
    first_skipped: dict[str, str] = field(default_factory=dict)
    """Where each skip reason first occurred, with its message."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Well-formed examples not used, by reason (over-long with overlong: drop, nothing left to train on)."""
    truncated: int = 0
    split: int = 0
    """Over-long text examples split into seq_len chunks (overlong: split); each chunk counts as an example."""
    weight: float = 1.0
    eval_examples: int = 0
    """Held out for eval (eval_fraction), or all of them for an eval dataset."""
    train_examples: int = 0
    """Examples in the training samples after the mixture (repeats counted)."""


@dataclass
class SplitReport:
    examples: int = 0
    samples: int = 0
    """Packed blocks (packing on) or padded rows (packing off)."""
    tokens: int = 0
    label_tokens: int = 0
    fill_ratio: float = 0.0
    """tokens / (samples x seq_len): the share of a seq_len row that is not padding."""


@dataclass
class PrepareReport:
    seq_len: int
    packing: bool
    datasets: list[DatasetReport] = field(default_factory=list)
    eval_datasets: list[DatasetReport] = field(default_factory=list)
    train: SplitReport = field(default_factory=SplitReport)
    eval: SplitReport | None = None
    retention: dict[str, SplitReport] = field(default_factory=dict)
    """eval.retention's datasets by name."""
    cache_path: str = ""
    cache_hit: bool = False
    seconds: float = 0.0
    """Time spent tokenizing and packing (when the cache was written)."""

    # The headline numbers for the training split, summed over datasets.
    @property
    def examples(self) -> int:
        return self.train.examples

    @property
    def tokens(self) -> int:
        return self.train.tokens

    @property
    def packed_blocks(self) -> int:
        return self.train.samples if self.packing else 0

    @property
    def fill_ratio(self) -> float:
        return self.train.fill_ratio

    @property
    def truncated(self) -> int:
        return sum(d.truncated for d in self.datasets + self.eval_datasets)

    @property
    def dropped(self) -> dict[str, int]:
        return _merge(d.dropped for d in self.datasets + self.eval_datasets)

    @property
    def skipped(self) -> dict[str, int]:
        return _merge(d.skipped for d in self.datasets + self.eval_datasets)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PrepareReport:
        raw = dict(raw)
        raw["datasets"] = [DatasetReport(**d) for d in raw["datasets"]]
        raw["eval_datasets"] = [DatasetReport(**d) for d in raw["eval_datasets"]]
        raw["train"] = SplitReport(**raw["train"])
        raw["eval"] = SplitReport(**raw["eval"]) if raw["eval"] else None
        raw["retention"] = {name: SplitReport(**r) for name, r in raw.get("retention", {}).items()}
        return cls(**raw)

    def __str__(self) -> str:
        lines = [f"seq_len {self.seq_len}, packing {'on' if self.packing else 'off'}"]
        for title, reports in (("dataset", self.datasets), ("eval dataset", self.eval_datasets)):
            for d in reports:
                lines += _dataset_lines(title, d)
        lines.append(_split_line("train", self.train, self.packing))
        if self.eval is not None:
            lines.append(_split_line("eval", self.eval, self.packing))
        for name, split in self.retention.items():
            lines.append(_split_line(f"retention {name}", split, self.packing))
        total = "; ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "0"
        skipped = "; ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "0"
        lines.append(f"truncated {self.truncated}, dropped: {total}, skipped rows: {skipped}")
        state = "reused" if self.cache_hit else f"written in {self.seconds:.1f} s"
        lines.append(f"cache {self.cache_path} ({state})")
        return "\n".join(lines)


def _merge(counts) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(total)


def _dataset_lines(title: str, d: DatasetReport) -> list[str]:
    line = f"{title} {d.path} [{d.format}]: {d.rows} rows -> {d.examples} examples"
    if title == "dataset":
        line += f", {d.eval_examples} held out for eval, {d.train_examples} in training (weight {d.weight:g})"
    lines = [line]
    if d.truncated:
        lines.append(f"  truncated to seq_len: {d.truncated}")
    if d.split:
        lines.append(f"  split into seq_len chunks: {d.split}")
    for reason, count in sorted(d.dropped.items()):
        lines.append(f"  dropped ({reason}): {count}")
    for reason, count in sorted(d.skipped.items()):
        lines.append(f"  skipped ({reason}): {count}, first at {d.first_skipped.get(reason, '?')}")
    return lines


def _split_line(name: str, s: SplitReport, packing: bool) -> str:
    unit = "packed blocks" if packing else "rows"
    return (
        f"{name}: {s.examples} examples, {s.tokens} tokens ({s.label_tokens} trained), {s.samples} {unit}, "
        f"fill ratio {s.fill_ratio:.3f}"
    )
