"""The strategies, one module each (full, lora, qlora); `get(cfg.strategy)` is how every other module asks what
differs between them. To add one: write a module implementing `protocol.Strategy` and register it below."""

from __future__ import annotations

from dtrain.strategies.full import FULL
from dtrain.strategies.lora import LORA
from dtrain.strategies.protocol import BuiltModel, Strategy
from dtrain.strategies.qlora import QLORA

_REGISTRY: dict[str, Strategy] = {s.name: s for s in (FULL, LORA, QLORA)}
NAMES = tuple(_REGISTRY)


def get(name: str) -> Strategy:
    """The strategy a config names (validated by the config, so a KeyError here is a programming error)."""
    return _REGISTRY[name]


__all__ = ["NAMES", "BuiltModel", "Strategy", "get"]
