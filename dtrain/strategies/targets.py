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
    import torch

    from dtrain.config import Config

# On the meta device a qlora base is still nn.Linear: bitsandbytes swaps those for Linear4bit at load.
ADAPTABLE = ("Linear", "Linear4bit", "Embedding", "Conv1D", "Conv1d", "Conv2d")


def target_problems(cfg: Config) -> list[str]:
    """Target modules and modules_to_save that this model does not have, each naming its key."""
    if not (cfg.model.local_dir() / "config.json").is_file():
        return []  # a missing model directory is reported by the config validation
    try:
        model, modules, parameters = model_modules(cfg)
    except (ValueError, KeyError, OSError) as e:
        return [f"model.path: cannot build the model from {cfg.model.path}/config.json: {e}"]
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, kind in modules.items() if kind in ADAPTABLE})
    problems = []
    if isinstance(cfg.lora.target_modules, list):
        for i, target in enumerate(cfg.lora.target_modules):
            found = [kind for name, kind in modules.items() if _matches(name, target)]
            if not found and any(_matches(name, target) for name in parameters):
                continue  # an expert tensor: peft's target_parameters
            if not found:
                named = sorted({".".join(name.rsplit(".", 2)[-2:]) for name in parameters})
                tensors = f"; its expert and router tensors: {', '.join(named)}" if named else ""
                problems.append(
                    f"lora.target_modules[{i}]: {target!r} is no module of this {model} "
                    f"(its layers LoRA can adapt: {', '.join(adaptable)}{tensors}; or use 'all-linear')"
                )
            elif any(_matches(name.rsplit(".", 1)[0], target) for name in parameters):
                continue  # a router (a module holding its weight as a matrix): its parameters are the target
            elif not any(kind in ADAPTABLE for kind in found):
                problems.append(f"lora.target_modules[{i}]: {target!r} is a {found[0]}, which LoRA cannot adapt")
    for i, name in enumerate(cfg.lora.modules_to_save):
        if not any(_matches(module, name) for module in modules):
            problems.append(f"lora.modules_to_save[{i}]: {name!r} is no module of this {model}")
    return problems


def expert_problems(cfg: Config) -> list[str]:
    """A mixture-of-experts model (dtrain.families, from config.json): what peft refuses about its adapter."""
    from dtrain.families import moe_traits

    if moe_traits(json.loads((cfg.model.local_dir() / "config.json").read_text())) is None:
        return []
    from dtrain.strategies.peft_adapters import expert_adapter_problems

    return expert_adapter_problems(cfg)


def model_modules(cfg: Config) -> tuple[str, dict[str, str], list[str]]:
    """The model's class name, {module name: class name} and the parameters LoRA reaches only as tensors (a mixture
    of experts' fused 3D experts: `split_targets`), from the cache when it has them."""
    if cfg.model.trust_remote_code:
        return _build(cfg)
    config_json = (cfg.model.local_dir() / "config.json").read_bytes()
    key = hashlib.sha256(config_json + version("transformers").encode()).hexdigest()[:32]
    cached = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dtrain" / "modules" / f"{key}.json"
    try:
        found = json.loads(cached.read_text())
        return found["model"], found["modules"], found["expert_tensors"]
    except (OSError, ValueError, KeyError):
        pass
    model, modules, tensors = _build(cfg)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staged = cached.with_name(f".tmp-{os.getpid()}-{cached.name}")
        staged.write_text(json.dumps({"model": model, "modules": modules, "expert_tensors": tensors}))
        os.replace(staged, cached)  # whole or absent for a concurrent reader
    except OSError:
        pass  # a read-only cache folder only costs the next launch the build
    return model, modules, tensors


def _build(cfg: Config) -> tuple[str, dict[str, str], list[str]]:
    from dtrain.strategies.loading import meta_model

    model = meta_model(cfg.model.local_dir(), cfg.model.trust_remote_code)
    modules = {name: type(m).__name__ for name, m in model.named_modules()}
    return type(model).__name__, modules, expert_tensors(model)


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


# ---------------------------------------------------------------------------------------------------------------
# Mixture-of-experts: expert parameters as LoRA targets
#
# transformers 5 keeps a layer's experts as fused 3D parameters (experts.gate_up_proj (E, 2I, h), down_proj) and
# its router as a parameter of its own module: neither is an nn.Linear. peft 0.22 adapts such parameters with
# `target_parameters` (its ParamWrapper, one LoRA pair per expert), and already maps the transformers 4.x names
# (gate_proj/up_proj/down_proj of the experts, Mixtral's w1/w3/w2, the router `gate`) and "all-linear" onto them
# for the families transformers converts (peft.utils.transformers_weight_conversion). dtrain lets a target name
# an expert parameter directly, makes "all-linear" reach every family's experts, and keeps the router frozen
# unless a target names it.


def split_targets(model: torch.nn.Module, target_modules: list[str] | str) -> tuple[list[str] | str, list[str]]:
    """(target_modules, target_parameters) for peft: a name that is no module of `model` but names expert tensors,
    or names a module that holds its weights as bare matrices (a router), becomes target parameters."""
    if isinstance(target_modules, str):
        return target_modules, []
    tensors = expert_tensors(model)
    modules, parameters = [], []
    for target in target_modules:
        owned = sorted({name.rsplit(".", 1)[-1] for name in tensors if _matches(name.rsplit(".", 1)[0], target)})
        if owned:
            parameters += [f"{target}.{name}" for name in owned]
        elif any(_matches(name, target) for name in tensors) and not any(
            _matches(name, target) for name, _ in model.named_modules()
        ):
            parameters.append(target)
        else:
            modules.append(target)
    return modules, parameters


def resolve_for_model(config, model: torch.nn.Module, target_modules: list[str] | str) -> None:
    """Complete a peft LoraConfig for `model` in place: peft's own mapping of 4.x names onto fused experts, the
    experts of every family for "all-linear", and the router left out unless `target_modules` names it."""
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    from dtrain.families import ROUTER_NAMES, sparse_blocks

    convert_peft_config_for_transformers(config, model=model, conversions=None)
    wanted = set(config.target_parameters or ())
    blocks = sparse_blocks(model)
    if target_modules == "all-linear":  # the experts' matrices, for families peft has no mapping for
        wanted |= {name for block in blocks for name, p in block.experts.named_parameters() if len(_shape(p)) == 3}
    names = {id(module): name for name, module in model.named_modules()}
    routers = [f"{names[id(block)]}.{name}" for block in blocks for name in ROUTER_NAMES if hasattr(block, name)]
    router_params = {f"{r}.{p}" for r in routers for p, _ in model.get_submodule(r).named_parameters()}
    named_router = isinstance(target_modules, list) and any(_matches(r, t) for r in routers for t in target_modules)
    if not named_router:
        tensors = expert_tensors(model)
        wanted = {t for t in wanted if not _routers_only(t, tensors, router_params)}
    config.target_parameters = sorted(wanted) or None


def _routers_only(target: str, tensors: list[str], router_params: set[str]) -> bool:
    """Whether target parameter `target` names router weights and nothing else."""
    matched = {name for name in tensors if _matches(name, target)}
    return bool(matched) and matched <= router_params


def expert_tensors(model: torch.nn.Module) -> list[str]:
    """Full names of the matrices owned by modules LoRA cannot wrap as a module (not nn.Linear and the like): a
    mixture of experts' fused expert tensors and its routers' weights (norm weights, 1D, are no LoRA target)."""
    return [
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if type(module).__name__ not in ADAPTABLE
        for name, param in module.named_parameters(recurse=False)
        if len(_shape(param)) >= 2
    ]


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's shape as the model sees it: ZeRO-3 leaves an empty partition with the real one in ds_shape."""
    return tuple(getattr(param, "ds_shape", param.shape))
