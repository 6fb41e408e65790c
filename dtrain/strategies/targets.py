"""Which modules LoRA can adapt in a model, checked by `dtrain check` and before every launch.

The modules (name -> class name) come from the model built from config.json on the meta device. Building it means
importing transformers: 4-6 s before any rank starts, on every launch. So the list is cached per user (like the
Hugging Face cache: $XDG_CACHE_HOME/dtrain, else ~/.cache/dtrain; not the run folder, which a refused config must
leave untouched), keyed by config.json's bytes and the transformers version, and later launches of the same model
read a small JSON file without importing torch. A model with its own code (trust_remote_code) is built every time:
its modules come from code files that config.json does not pin.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dtrain.config import Config

# On the meta device a qlora base is still nn.Linear: bitsandbytes swaps those for Linear4bit at load.
ADAPTABLE = ("Linear", "Linear4bit", "Embedding", "Conv1D", "Conv1d", "Conv2d")


def target_problems(cfg: Config) -> list[str]:
    """Target modules and modules_to_save that this model does not have, each naming its key."""
    if not (cfg.model.local_dir() / "config.json").is_file():
        return []  # a missing model directory is reported by the config validation
    try:
        model, modules = model_modules(cfg)
    except (ValueError, KeyError, OSError) as e:
        return [f"model.path: cannot build the model from {cfg.model.path}/config.json: {e}"]
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, kind in modules.items() if kind in ADAPTABLE})
    problems = []
    if isinstance(cfg.lora.target_modules, list):
        for i, target in enumerate(cfg.lora.target_modules):
            found = [kind for name, kind in modules.items() if _matches(name, target)]
            if not found:
                problems.append(
                    f"lora.target_modules[{i}]: {target!r} is no module of this {model} "
                    f"(its layers LoRA can adapt: {', '.join(adaptable)}; or use 'all-linear')"
                )
            elif not any(kind in ADAPTABLE for kind in found):
                problems.append(f"lora.target_modules[{i}]: {target!r} is a {found[0]}, which LoRA cannot adapt")
    for i, name in enumerate(cfg.lora.modules_to_save):
        if not any(_matches(module, name) for module in modules):
            problems.append(f"lora.modules_to_save[{i}]: {name!r} is no module of this {model}")
    return problems


def model_modules(cfg: Config) -> tuple[str, dict[str, str]]:
    """The model's class name and {module name: class name}, from the cache when it has them."""
    if cfg.model.trust_remote_code:
        return _build(cfg)
    config_json = (cfg.model.local_dir() / "config.json").read_bytes()
    key = hashlib.sha256(config_json + version("transformers").encode()).hexdigest()[:32]
    cached = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dtrain" / "modules" / f"{key}.json"
    try:
        found = json.loads(cached.read_text())
        return found["model"], found["modules"]
    except (OSError, ValueError, KeyError):
        pass
    model, modules = _build(cfg)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staged = cached.with_name(f".tmp-{os.getpid()}-{cached.name}")
        staged.write_text(json.dumps({"model": model, "modules": modules}))
        os.replace(staged, cached)  # whole or absent for a concurrent reader
    except OSError:
        pass  # a read-only cache folder only costs the next launch the build
    return model, modules


def _build(cfg: Config) -> tuple[str, dict[str, str]]:
    from dtrain.strategies.loading import meta_model

    model = meta_model(cfg.model.local_dir(), cfg.model.trust_remote_code)
    return type(model).__name__, {name: type(m).__name__ for name, m in model.named_modules()}


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)
