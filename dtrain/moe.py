"""Mixture-of-experts in the training step: the router's load-balancing loss and the load of each expert.

transformers' MoE causal LMs compute the Switch-Transformer load-balancing loss (`load_balancing_loss_func`) from
the router logits when called with `output_router_logits=True`, and add `router_aux_loss_coef` times it to the
returned loss. dtrain asks for it in training only (eval and `dtrain eval` compare the plain language-model loss),
backpropagates the sum, and logs the two apart: train/loss is the token-mean LM loss that resume and eval compare,
train/aux_loss the balancing loss (mean over micro batches and ranks, the average the gradient sees). The same
router logits give the tokens each expert received (top-k of the router's softmax, as the balancing loss counts),
summed over the step on all ranks, logged per sparse layer as max/mean (1.0: perfectly balanced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dtrain.families import moe_traits


@dataclass(frozen=True)
class RouterLoss:
    coef: float
    num_experts: int
    experts_per_token: int
    sparse_layers: tuple[int, ...]
    """Decoder layers with a router, in the order of the output's router_logits."""

    @classmethod
    def of(cls, causal_lm: torch.nn.Module) -> RouterLoss | None:
        """For a model whose family has a balancing loss with a coefficient above 0 (after model.router_aux_loss_coef
        was applied at load); None otherwise: the plain forward, nothing logged."""
        traits = moe_traits(causal_lm.config.to_dict())
        if traits is None or traits.aux_coef_key is None or traits.aux_coef <= 0:
            return None
        return cls(traits.aux_coef, traits.num_experts, traits.experts_per_token, traits.sparse_layers)

    forward_kwargs = {"output_router_logits": True}

    @property
    def stats_size(self) -> int:
        """Elements `step_stats` returns: the aux loss, then tokens per expert for each sparse layer."""
        return 1 + len(self.sparse_layers) * self.num_experts

    def lm_loss(self, output: Any) -> torch.Tensor:
        """The language-model part of `output.loss` (detached): transformers added coef x aux_loss to it."""
        return output.loss.detach().float() - self.coef * output.aux_loss.detach().float()

    def step_stats(self, output: Any) -> torch.Tensor:
        """[aux loss, tokens per expert of each sparse layer...] of one micro batch, to be summed over the step."""
        counts = [
            torch.bincount(
                torch.topk(logits.detach().float().softmax(-1), self.experts_per_token, dim=-1).indices.reshape(-1),
                minlength=self.num_experts,
            ).float()
            for logits in output.router_logits
        ]
        return torch.cat([output.aux_loss.detach().float().reshape(1), *counts])

    def scalars(self, summed: list[float], micro_batches: int) -> dict[str, float]:
        """train/ scalars from the step's stats summed over micro batches and ranks (`micro_batches` of them)."""
        aux, counts = summed[0], torch.tensor(summed[1:]).reshape(len(self.sparse_layers), self.num_experts)
        imbalance = (counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-9)).tolist()
        layers = {
            f"expert_load_max_over_mean/layer_{layer:03d}": value
            for layer, value in zip(self.sparse_layers, imbalance, strict=True)
        }
        return {"aux_loss": aux / micro_batches, "expert_load_max_over_mean": max(imbalance), **layers}


def experts_line(causal_lm: torch.nn.Module) -> str | None:
    """The run log's line on how a mixture of experts runs its experts; None for a dense model. transformers 5
    decides it the way dtrain.attention decides attention: grouped_mm (one grouped GEMM over all experts) where
    torch's grouped GEMM runs for the device and dtype, else the eager per-expert loop (modeling_utils,
    get_correct_experts_implementation)."""
    if moe_traits(causal_lm.config.to_dict()) is None:
        return None
    chosen = getattr(causal_lm.config, "_experts_implementation", None) or "eager"
    return f"experts: {chosen} (transformers' choice: grouped_mm where torch's grouped GEMM runs here, else eager)"
