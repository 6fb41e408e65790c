"""Is a resumed run the same run? The config a checkpoint was trained with (its config.yaml) and what it was trained
on (fingerprints in trainer_state.json) against the config and files of the run about to resume from it.

Three kinds of difference:
- safe: when things happen, not what is trained (schedule length, eval/logging/checkpoint cadence, timeouts, a
  moved but identical model or data file): allowed and printed;
- shape: the saved tensors would not fit the model (strategy, adapter shape, quantization, optimizer kind):
  refused, and no override can make it load;
- meaning: everything else (the model's weights, the tokenizer, data and its order, precision, the optimization
  hyperparameters): refused unless named in `checkpoint.allow_changes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SAFE = (
    "output_dir", "train.max_steps", "train.epochs", "eval.", "logging.", "checkpoint.", "data.cache_dir",
    "deepspeed.timeout_minutes", "deepspeed.offload_optimizer.pin_memory", "deepspeed.offload_param.pin_memory",
)  # fmt: skip
SHAPE = ("strategy", "lora.r", "lora.target_modules", "lora.modules_to_save", "lora.bias", "quantization.",
         "train.optimizer")  # fmt: skip
# Config keys whose value is a path: compared by the fingerprint of what they point to, not by their text.
_IDENTITY = {"model.path": "model", "model.tokenizer_path": "tokenizer"}


@dataclass
class Changes:
    refused: list[str] = field(default_factory=list)
    """`key: old -> new` lines the run may not resume with."""
    unloadable: list[str] = field(default_factory=list)
    """The subset of refused keys whose change no override can make work."""
    allowed: list[str] = field(default_factory=list)
    """Differences accepted (safe, identical content under another path, or named in allow_changes)."""


def compare(saved: dict[str, Any], saved_prints: dict[str, str], current: dict[str, Any], prints: dict[str, str],
            allow: list[str]) -> Changes:  # fmt: skip
    old, new = flatten(saved), flatten(current)
    changes = Changes()
    for key in sorted(set(old) | set(new)):
        was, now = old.get(key, "<absent>"), new.get(key, "<absent>")
        identity = _IDENTITY.get(key) or (key if key.startswith("data.") and key.endswith(".path") else None)
        if identity and saved_prints.get(identity) and prints.get(identity):
            if saved_prints[identity] != prints[identity]:
                changes.refused.append(f"{key}: {was} -> {now} (different content)")
            elif was != now:
                changes.allowed.append(f"{key}: {was} -> {now} (same content)")
            continue
        if was == now:
            continue
        line = f"{key}: {was!r} -> {now!r}"
        if _matches(key, SHAPE):
            changes.refused.append(line)
            changes.unloadable.append(key)
        elif _matches(key, SAFE) or _matches(key, allow):
            changes.allowed.append(line)
        else:
            changes.refused.append(line)
    return changes


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists of dicts -> {dotted key: leaf}; lists of plain values stay one leaf."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, list) and any(isinstance(v, dict) for v in node):
        out = {f"{prefix}.count": len(node)}
        for i, v in enumerate(node):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: node}


def _matches(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """`train.lr` matches itself; `eval.` and `data` match every key below them."""
    return any(
        key == p or key.startswith(p if p.endswith(".") else p + ".") or key.startswith(p + "[") for p in patterns
    )
