"""Is a resumed run the same run? The config a checkpoint was trained with (its config.yaml) and what it was trained
on (fingerprints in trainer_state.json) against the config and files of the run about to resume from it.

Three kinds of difference:
- safe: when things happen, not what is trained (schedule length, eval/logging/checkpoint cadence, timeouts, a
  moved but identical model or data file): allowed and printed;
- shape: the saved tensors would not fit the model (strategy, adapter shape, quantization, optimizer kind):
  refused, and no override can make them load;
- meaning: everything else (the model's weights, the tokenizer, data and its order, precision, the optimization
  hyperparameters): refused unless named in `checkpoint.allow_changes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dtrain.config.typed import flatten

SAFE = (
    "output_dir", "train.max_steps", "train.epochs", "eval", "logging", "checkpoint", "data.cache_dir",
    "deepspeed.timeout_minutes", "deepspeed.offload_optimizer.pin_memory", "deepspeed.offload_param.pin_memory",
)  # fmt: skip
SHAPE = ("strategy", "lora.r", "lora.target_modules", "lora.modules_to_save", "lora.bias", "lora.use_dora",
         "quantization", "train.optimizer")  # fmt: skip
STRATEGY_SECTIONS = ("lora", "quantization")
"""Sections that only some strategies read: compared only when the strategy being resumed reads them."""
# Keys holding paths: compared by the fingerprint of what they point to (see dtrain.fingerprint), not by their text.
_PATH_PRINTS = {"model.path": "model", "model.tokenizer_path": "tokenizer"}


@dataclass
class Changes:
    refused: list[str] = field(default_factory=list)
    """`key: old -> new` lines the run may not resume with."""
    unloadable: list[str] = field(default_factory=list)
    """Refused keys whose change no override can make work."""
    allowed: list[str] = field(default_factory=list)
    """Differences accepted: safe, the same content under another path, or named in allow_changes."""


def compare(
    saved: dict[str, Any],
    saved_prints: dict[str, str],
    current: dict[str, Any],
    prints: dict[str, str],
    read_sections: tuple[str, ...],
) -> Changes:
    """`saved`/`current`: Config.to_dict() of the checkpoint and of this run; prints: dtrain.fingerprint's."""
    old, new = flatten(saved), flatten(current)
    allow = list(current.get("checkpoint", {}).get("allow_changes") or [])
    changes = Changes()
    for what in sorted(set(saved_prints) & set(prints)):
        if saved_prints[what] != prints[what]:
            key = next((k for k, v in _PATH_PRINTS.items() if v == what), what)
            line = f"{key}: {old.get(key)} -> {new.get(key)} (different content: {what} fingerprint changed)"
            _classify(changes, key, line, allow)
    for key in sorted(set(old) | set(new)):
        was, now = old.get(key, "<absent>"), new.get(key, "<absent>")
        if was == now or _skipped(key, read_sections):
            continue
        if _is_path(key) and saved_prints:  # content already compared above
            changes.allowed.append(f"{key}: {was} -> {now} (same content)")
            continue
        _classify(changes, key, f"{key}: {was!r} -> {now!r}", allow)
    return changes


def _classify(changes: Changes, key: str, line: str, allow: list[str]) -> None:
    if _matches(key, SHAPE):
        changes.refused.append(line)
        changes.unloadable.append(key)
    elif _matches(key, SAFE) or _matches(key, allow):
        changes.allowed.append(line)
    else:
        changes.refused.append(line)


def _is_path(key: str) -> bool:
    return key in _PATH_PRINTS or (key.startswith("data.") and key.endswith(".path"))


def _skipped(key: str, read_sections: tuple[str, ...]) -> bool:
    return any(_matches(key, (s,)) for s in STRATEGY_SECTIONS if s not in read_sections)


def _matches(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """`train.lr` matches itself; `eval` and `data.datasets` match every key below them."""
    return any(key == p or key.startswith(p + ".") or key.startswith(p + "[") for p in patterns)
