"""The model's shape from config.json and exact parameter counts, for Llama/Mistral/Qwen2/Qwen3-style decoders and
the Qwen3-MoE / Mixtral mixture-of-experts decoders.

Pure arithmetic (no torch): the strategies use it to tell the planner what they train and store.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dtrain.config import LoraConfig
from dtrain.families import MoeTraits, moe_traits

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_LINEARS = DECODER_LINEARS[:4]
MLP_LINEARS = DECODER_LINEARS[4:]
QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe")
# Families whose causal-LM forward is exactly `lm_head(final hidden states)` then ForCausalLMLoss: no logit scale or
# soft-capping that a chunked path would have to repeat (Gemma, Cohere, ... keep the plain forward), and no router
# logits for an auxiliary loss (the MoE families). dtrain.loss chunks these; plan counts their loss chunked.
CHUNKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory, for Llama/Mistral/Qwen2/Qwen3-style decoders and their mixture-of-experts kin
    (Qwen3-MoE, Mixtral: the dense MLP of some or all layers replaced by a router and fused experts)."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    biased: tuple[str, ...] = ()
    """Decoder projections that carry a bias (Qwen2: q/k/v; Llama: attention_bias / mlp_bias)."""
    qk_norm: bool = False
    """Qwen3's RMSNorm on each query/key head."""
    moe: MoeTraits | None = None
    """Experts, top-k and sparse layers (dtrain.families); None: every layer has the dense MLP."""

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelShape:
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r}: plan supports {', '.join(SUPPORTED_MODEL_TYPES)}")
        heads = config["num_attention_heads"]
        biased: tuple[str, ...] = ()
        if model_type == "qwen2":  # hard-coded in transformers: bias on q/k/v, none on o
            biased = ("q_proj", "k_proj", "v_proj")
        elif model_type in ("llama", "qwen3", "qwen3_moe") and config.get("attention_bias"):
            biased = ATTENTION_LINEARS
        if model_type == "llama" and config.get("mlp_bias"):
            biased += MLP_LINEARS
        return cls(
            model_type=model_type,
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            biased=biased,
            qk_norm=model_type in QK_NORM_MODEL_TYPES,
            # the dense families' classes ignore expert keys a config.json may carry
            moe=moe_traits(config) if model_type in ("qwen3_moe", "mixtral") else None,
        )

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each decoder-layer projection (the MLP's: of a dense layer)."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def sparse_layers(self) -> int:
        return len(self.moe.sparse_layers) if self.moe else 0

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.sparse_layers

    def linear_counts(self) -> dict[str, tuple[int, int, int]]:
        """Each nn.Linear of the decoder as name -> (in_features, out_features, how many in the model): attention
        in every layer, the MLP projections in dense layers. A sparse block's router and experts are parameters
        of their own modules, not nn.Linear."""
        dims = self.linear_dims()
        return {
            name: (*dims[name], self.num_layers if name in ATTENTION_LINEARS else self.dense_layers)
            for name in DECODER_LINEARS
            if name in ATTENTION_LINEARS or self.dense_layers
        }

    def linear_params(self, name: str) -> int:
        fan_in, fan_out = self.linear_dims()[name]
        return fan_in * fan_out + (fan_out if name in self.biased else 0)

    @property
    def expert_params(self) -> int:
        """One routed expert: gate and up (fused, 2·I x h) and down (h x I)."""
        return 3 * self.hidden_size * self.moe.expert_intermediate_size if self.moe else 0

    @property
    def experts_module_params(self) -> int:
        """What one layer's experts module owns: all its experts' fused 3D parameters."""
        return self.moe.num_experts * self.expert_params if self.moe else 0

    @property
    def sparse_block_params(self) -> int:
        """Router (experts x h) and experts of one sparse layer."""
        return self.moe.num_experts * self.hidden_size + self.experts_module_params if self.moe else 0

    @property
    def layer_params(self) -> int:
        """A dense decoder layer; a sparse one has `sparse_block_params` in place of the MLP projections."""
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return sum(self.linear_params(name) for name in DECODER_LINEARS) + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """Exact parameter count of the transformers model; a tied lm_head shares the embedding."""
        heads = 1 if self.tie_word_embeddings else 2
        dense_mlp = sum(self.linear_params(name) for name in MLP_LINEARS)
        sparse = self.sparse_layers * (self.sparse_block_params - dense_mlp)
        return heads * self.embedding_params + self.num_layers * self.layer_params + sparse + self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: all but the experts it is not routed to (top-k of each sparse layer)."""
        if not self.moe:
            return self.total_params
        idle = self.moe.num_experts - self.moe.experts_per_token
        return self.total_params - self.sparse_layers * idle * self.expert_params

    @property
    def quantizable_params(self) -> int:
        """Weights bitsandbytes stores in 4 bit: every decoder nn.Linear. Embeddings, lm_head, norms, biases stay,
        and so do a sparse block's router and fused experts (transformers replaces nn.Linear only; docs/moe.md)."""
        return sum(i * o * n for i, o, n in self.linear_counts().values())

    @property
    def largest_layer_params(self) -> int:
        """DeepSpeed's `largest_layer_params`: the most parameters one module owns directly (with fused experts:
        one layer's experts module, gathered whole under ZeRO-3)."""
        return max(self.embedding_params, self.experts_module_params, *(self.linear_params(n) for n in DECODER_LINEARS))

    def describe(self) -> str:
        heads = f"{self.num_heads}/{self.num_kv_heads} heads"
        experts = ""
        if self.moe:
            experts = (
                f", {self.sparse_layers} sparse layers of {self.moe.num_experts} experts (top-"
                f"{self.moe.experts_per_token}, expert intermediate {self.moe.expert_intermediate_size}),"
                f" {self.active_params:,} active per token"
            )
        return (
            f"{self.model_type}, {self.total_params:,} parameters ({self.num_layers} layers, hidden {self.hidden_size},"
            f" {heads}, intermediate {self.intermediate_size}, vocab {self.vocab_size}"
            f"{', tied embeddings' if self.tie_word_embeddings else ''}{experts})"
        )


def load_model_shape(model_path: str | Path) -> ModelShape:
    """Read <model_path>/config.json — the only file plan needs."""
    return ModelShape.from_hf_config(json.loads((Path(model_path) / "config.json").read_text()))


def lora_linear_params(in_features: int, out_features: int, r: int) -> int:
    """LoRA adds A (r x in) and B (out x r) beside a frozen in x out weight."""
    return r * (in_features + out_features)


EXPERT_GATE_UP, EXPERT_DOWN, ROUTER = "experts.gate_up_proj", "experts.down_proj", "gate"


def expert_tensors(shape: ModelShape) -> dict[str, tuple[int, int, int]]:
    """A sparse block's LoRA targets that are tensors, not nn.Linear (peft target_parameters: one rank-r pair per
    expert), as name -> (in_features, out_features, how many in the model): the fused experts and the router."""
    if not shape.moe:
        return {}
    h, i, e, layers = shape.hidden_size, shape.moe.expert_intermediate_size, shape.moe.num_experts, shape.sparse_layers
    return {EXPERT_GATE_UP: (h, 2 * i, layers * e), EXPERT_DOWN: (i, h, layers * e), ROUTER: (h, e, layers)}


def lora_targets(shape: ModelShape, target_modules: list[str] | str) -> dict[str, tuple[int, int, int]]:
    """Adapted modules and expert tensors as name -> (in_features, out_features, how many in the model).

    "all-linear" means, as in peft, every Linear except the output layer (lm_head), and on a mixture of experts
    every expert tensor but the router (dtrain.strategies.targets). peft's mapping of the transformers 4.x names
    adapts the fused gate and up projections at rank 2r: counted as two rank-r adapters. Names match peft's rule for
    plain names: every module (or expert tensor) whose name ends with it."""
    linears = shape.linear_counts()
    tensors = expert_tensors(shape)
    if target_modules == "all-linear":
        if not tensors:
            return linears
        fan_in, fan_out, count = tensors[EXPERT_GATE_UP]
        return {**linears, EXPERT_GATE_UP: (fan_in, fan_out, 2 * count), EXPERT_DOWN: tensors[EXPERT_DOWN]}
    extra = {
        "lm_head": (shape.hidden_size, shape.vocab_size, 1),
        "embed_tokens": (shape.vocab_size, shape.hidden_size, 1),
    }
    found = {}
    for target in target_modules:
        hits = {name: dims for name, dims in {**linears, **tensors}.items() if _named(name, target)}
        if not hits and target not in extra:
            known = ", ".join([*linears, *tensors, *extra])
            raise ValueError(f"lora.target_modules: {target} not in a {shape.model_type} model (known: {known})")
        found |= hits or {target: extra[target]}
    return found


def _named(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_trainable_params(shape: ModelShape, lora: LoraConfig) -> int:
    """Exactly what peft's `get_nb_trainable_parameters()[0]` reports for this LoraConfig."""
    targets = lora_targets(shape, lora.target_modules)
    adapters = sum(lora_linear_params(i, o, lora.r) * n for i, o, n in targets.values())
    if lora.use_dora:  # one trained magnitude per output feature of each adapted Linear
        adapters += sum(o * n for _, o, n in targets.values())
    return adapters + trained_bias_params(shape, lora, targets) + _modules_to_save_params(shape, lora.modules_to_save)


def trained_bias_params(shape: ModelShape, lora: LoraConfig, targets: dict) -> int:
    """lora.bias "all" trains every bias, "lora_only" those of adapted modules."""
    if lora.bias == "none":
        return 0
    linears = shape.linear_counts()
    names = [n for n in shape.biased if n in linears and (lora.bias == "all" or n in targets)]
    return sum(linears[n][1] * linears[n][2] for n in names)


def _modules_to_save_params(shape: ModelShape, names: list[str]) -> int:
    """peft trains a full copy of each module_to_save (and keeps the frozen original)."""
    sizes = {"lm_head": shape.embedding_params, "embed_tokens": shape.embedding_params, "norm": shape.hidden_size}
    unknown = [n for n in names if n not in sizes]
    if unknown:
        raise ValueError(
            f"lora.modules_to_save: {', '.join(unknown)} not supported by plan (known: {', '.join(sizes)})"
        )
    return sum(sizes[n] for n in names)


def nf4_tensor_bytes(numel: int, double_quant: bool) -> int:
    """Exact bitsandbytes storage of one 4-bit weight (nf4 or fp4; bnb 0.50, measured by tests/test_plan.py).

    Two 4-bit values per byte; one absmax per 64-value block, fp32, or with double quantization uint8 plus a second
    level of one fp32 absmax per 256 blocks, a 256-entry fp32 code and an fp32 offset; a 16-entry fp32 4-bit code."""
    blocks = math.ceil(numel / 64)
    packed, code4 = math.ceil(numel / 2), 16 * 4
    if not double_quant:
        return packed + 4 * blocks + code4
    return packed + blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4 + code4


@dataclass(frozen=True)
class ParamCounts:
    """What the model holds in training, by how it is stored."""

    trainable: int
    frozen: int
    """Frozen elements kept in the compute dtype (a LoRA base; a QLoRA model's embeddings, norms, lm_head)."""
    quantized_bytes: int = 0
    """Storage of the 4-bit weights of a QLoRA base, constants included."""
    largest_layer: int = 0
    """DeepSpeed's largest_layer_params."""


@dataclass(frozen=True)
class PlanTerms:
    """What a strategy tells the planner about one configuration of it."""

    counts: ParamCounts
    optimizer: str
    """The optimizer the estimate assumes (a full fine-tune alternative of an 8-bit adapter run uses AdamW)."""
    compute_dtype: str
    """Dtype of the activations (qlora: the 4-bit layers' compute dtype)."""
    adapters: dict[str, tuple[int, int, int]] | None = None
    """Adapted modules (lora_targets) when the base is frozen; None when every weight trains."""
    dequantized_elements: int = 0
    """Elements of the largest weight dequantized at once for a matmul (a 4-bit base)."""
