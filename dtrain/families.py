"""What varies between model families, read from the model's config.json and module structure: the one table the
loader, the trainer, the planner and the checks ask, so none of them branches on a family name.

Mixture-of-experts traits. Families spell the same facts with different config keys (Qwen: `num_experts`, Mixtral
and gpt-oss: `num_local_experts`, DeepSeek: `n_routed_experts`), so each trait is a tuple of the keys the ecosystem
uses, first present wins. Which layers are sparse is read from the keys that make a layer dense (Qwen's
`mlp_only_layers` and `decoder_sparse_step`, DeepSeek's `first_k_dense_replace`).

ZeRO-3 leaves. A sparse block is found from the model's structure — a module with a router child (`gate`, `router`)
and an `experts` child — never from a class list. transformers 5 keeps each layer's experts as fused 3D parameters of
one module, called once per layer on every rank: nothing to mark. Where experts are separate modules (transformers
4.x, remote code), each rank calls only the experts its tokens were routed to, and ZeRO-3's per-module gathers
diverge between ranks and hang; marking the block a ZeRO-3 leaf makes DeepSpeed gather all of its parameters at the
block (`deepspeed.utils.set_z3_leaf_modules`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_topk")
EXPERT_WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size")
AUX_COEF_KEYS = ("router_aux_loss_coef", "aux_loss_alpha")
"""The coefficient transformers' causal-LM forward multiplies the load-balancing loss by (MoeCausalLMOutputWithPast)."""
ROUTER_NAMES = ("gate", "router")
EXPERTS_NAME = "experts"


@dataclass(frozen=True)
class MoeTraits:
    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    """Width of one routed expert's MLP."""
    sparse_layers: tuple[int, ...]
    """Decoder layers whose MLP is the sparse block; the others are dense MLPs of intermediate_size."""
    shared_intermediate_size: int = 0
    """Total width of the shared (always-on) experts of a sparse layer; 0: none."""
    aux_coef_key: str | None = None
    """The config key of the router load-balancing coefficient; None: the family has no auxiliary loss in
    transformers (DeepSeek-V3 balances with a routing bias instead)."""
    aux_coef: float = 0.0

    @property
    def active_fraction(self) -> float:
        return self.experts_per_token / self.num_experts


def _first(config: dict, keys: tuple[str, ...]) -> tuple[str | None, object]:
    return next(((k, config[k]) for k in keys if config.get(k) is not None), (None, None))


def moe_traits(config: dict) -> MoeTraits | None:
    """The mixture-of-experts traits of a config.json (as a dict); None for a dense model."""
    _, experts = _first(config, EXPERT_KEYS)
    if not experts:
        return None
    layers = config["num_hidden_layers"]
    dense = set(config.get("mlp_only_layers") or ())
    step = config.get("decoder_sparse_step") or 1
    first_sparse = config.get("first_k_dense_replace") or 0
    sparse = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0 and i >= first_sparse)
    width = _first(config, EXPERT_WIDTH_KEYS)[1]
    shared = config.get("shared_expert_intermediate_size") or (config.get("n_shared_experts") or 0) * width
    aux_key, aux_coef = _first(config, AUX_COEF_KEYS)
    return MoeTraits(
        num_experts=int(experts),
        experts_per_token=int(_first(config, TOP_K_KEYS)[1]),
        expert_intermediate_size=int(width),
        sparse_layers=sparse,
        shared_intermediate_size=int(shared),
        aux_coef_key=aux_key,
        aux_coef=float(aux_coef or 0.0),
    )


def router_loss_overrides(config: dict, coef: float | None) -> dict[str, float]:
    """from_pretrained keyword arguments that set a mixture-of-experts model's load-balancing coefficient to `coef`
    (model.router_aux_loss_coef) under its family's key; none for None (config.json's stays) or a dense model."""
    traits = moe_traits(config)
    if coef is None or traits is None or traits.aux_coef_key is None:
        return {}
    return {traits.aux_coef_key: coef}


def sparse_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module holding a router and experts (see the module docstring)."""
    return [
        module
        for module in model.modules()
        if hasattr(module, EXPERTS_NAME) and any(hasattr(module, name) for name in ROUTER_NAMES)
    ]


def zero3_leaf_classes(model: torch.nn.Module) -> list[type]:
    """Classes of the sparse blocks whose experts are separate modules: the ones to mark ZeRO-3 leaves."""
    import torch

    return sorted(
        {type(block) for block in sparse_blocks(model) if isinstance(block.experts, torch.nn.ModuleList)},
        key=lambda cls: cls.__name__,
    )


def mark_zero3_leaves(model: torch.nn.Module) -> list[str]:
    """Mark the sparse blocks with separate expert modules as ZeRO-3 leaves; returns their class names."""
    classes = zero3_leaf_classes(model)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, classes)
    return [cls.__name__ for cls in classes]
