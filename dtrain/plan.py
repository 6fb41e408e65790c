"""`dtrain plan`: will this run fit, and what is the cheapest configuration that does — from config.json alone.

Memory is given per GPU, in CPU RAM per node and on NVMe per node, in five parts:

- parameters, gradients, optimizer states: the model states. For full fine-tuning with Adam in bf16 they equal
  DeepSpeed's own estimators (`estimate_zero2/3_model_states_mem_needs`, a test compares them), including their
  1.5x host-memory safety factor, which is shown under buffers.
- activations: what autograd keeps for the backward pass (`activation_bytes`).
- buffers: ZeRO-3's gathered largest layer, DeepSpeed's fp32 step buffer, its host safety factor and load-time
  peak, communication buckets, swap buffers, and a per-process CUDA/host allowance.

Everything here is a pure function of the model shape, our Config and the hardware: no weights, no process group.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from dtrain.config import Config, ConfigError, LoraConfig, QuantizationConfig
from dtrain.layout import BatchLayout

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STRATEGIES = ("full", "lora", "qlora")

# DeepSpeed's estimators multiply host memory by this "additional_buffer_factor" (pinned staging, fragmentation).
DS_HOST_BUFFER_FACTOR = 1.5
# Rough allowances DeepSpeed's model-state estimate leaves out. Not measurable on our CPU-only machines: they are
# deliberately round numbers, listed under "buffers" so a user can see and discount them.
CUDA_RUNTIME_BYTES = 1_000_000_000  # per GPU process: CUDA context, cuBLAS workspace, NCCL channels
HOST_RUNTIME_BYTES = 3_000_000_000  # per rank in CPU RAM: Python, torch/CUDA libraries, data loader
# DeepSpeed defaults that size the NVMe swap buffers (runtime/zero/offload_config.py, runtime/zero/config.py).
DS_SUB_GROUP_SIZE = 1_000_000_000
DS_OPTIMIZER_SWAP_BUFFERS = 4
DS_PARAM_SWAP_BUFFERS = 5
DS_PARAM_SWAP_BUFFER_ELEMENTS = 100_000_000

# How much slower each remedy makes a step, in rough percent. Only the order matters: it decides which fitting
# configuration is "cheapest". Recomputation costs one extra forward (~1/3 of forward+backward FLOPs); the ZeRO/offload
# ladder follows DeepSpeed's speed order as documented by Hugging Face (stage 2 > stage 2 + optimizer offload >
# stage 3 > stage 3 + offloads); NVMe is slower than CPU RAM. See docs/plan.md.
COST_CHECKPOINTING = 33
COST_STAGE3 = 15
COST_OFFLOAD_OPTIMIZER = {"none": 0, "cpu": 10, "nvme": 50}
COST_OFFLOAD_PARAM = {"none": 0, "cpu": 50, "nvme": 150}


# ---------------------------------------------------------------------------------------------------------------
# Model shape and parameter counts


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory, for Llama/Mistral/Qwen2/Qwen3-style decoders (no MoE)."""

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

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelShape:
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r}: plan supports {', '.join(SUPPORTED_MODEL_TYPES)}")
        if config.get("num_local_experts") or config.get("num_experts"):
            raise ValueError(f"model_type {model_type!r}: mixture-of-experts models are not supported by plan")
        heads = config["num_attention_heads"]
        biased: tuple[str, ...] = ()
        if model_type == "qwen2":  # hard-coded in transformers: bias on q/k/v, none on o
            biased = ("q_proj", "k_proj", "v_proj")
        elif model_type in ("llama", "qwen3") and config.get("attention_bias"):
            biased = ("q_proj", "k_proj", "v_proj", "o_proj")
        if model_type == "llama" and config.get("mlp_bias"):
            biased += ("gate_proj", "up_proj", "down_proj")
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
            qk_norm=model_type == "qwen3",
        )

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each decoder-layer projection."""
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

    def linear_params(self, name: str) -> int:
        fan_in, fan_out = self.linear_dims()[name]
        return fan_in * fan_out + (fan_out if name in self.biased else 0)

    @property
    def layer_params(self) -> int:
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return sum(self.linear_params(name) for name in DECODER_LINEARS) + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """Exact parameter count of the transformers model; a tied lm_head shares the embedding."""
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.embedding_params + self.num_layers * self.layer_params + self.hidden_size

    @property
    def quantizable_params(self) -> int:
        """Weights bitsandbytes stores in 4 bit: every decoder Linear; embeddings, lm_head, norms, biases stay."""
        return self.num_layers * sum(self.linear_dims()[n][0] * self.linear_dims()[n][1] for n in DECODER_LINEARS)

    @property
    def largest_layer_params(self) -> int:
        """DeepSpeed's `largest_layer_params`: the most parameters one module owns directly."""
        return max(self.embedding_params, *(self.linear_params(n) for n in DECODER_LINEARS))

    def describe(self) -> str:
        heads = f"{self.num_heads}/{self.num_kv_heads} heads"
        return (
            f"{self.model_type}, {self.total_params:,} parameters ({self.num_layers} layers, hidden {self.hidden_size},"
            f" {heads}, intermediate {self.intermediate_size}, vocab {self.vocab_size}"
            f"{', tied embeddings' if self.tie_word_embeddings else ''})"
        )


def load_model_shape(model_path: str | Path) -> ModelShape:
    """Read <model_path>/config.json — the only file plan needs."""
    return ModelShape.from_hf_config(json.loads((Path(model_path) / "config.json").read_text()))


def lora_linear_params(in_features: int, out_features: int, r: int) -> int:
    """LoRA adds A (r x in) and B (out x r) beside a frozen in x out weight."""
    return r * (in_features + out_features)


def lora_targets(shape: ModelShape, target_modules: list[str] | str) -> dict[str, tuple[int, int, int]]:
    """Adapted modules as name -> (in_features, out_features, how many in the model).

    "all-linear" means, as in peft, every Linear except the output layer (lm_head). Names match peft's rule for
    plain names: every module whose name ends with it."""
    dims = shape.linear_dims()
    if target_modules == "all-linear":
        return {name: (*dims[name], shape.num_layers) for name in DECODER_LINEARS}
    extra = {
        "lm_head": (shape.hidden_size, shape.vocab_size, 1),
        "embed_tokens": (shape.vocab_size, shape.hidden_size, 1),
    }
    unknown = [t for t in target_modules if t not in dims and t not in extra]
    if unknown:
        known = ", ".join([*DECODER_LINEARS, *extra])
        raise ValueError(
            f"lora.target_modules: {', '.join(unknown)} not in a {shape.model_type} model (known: {known})"
        )
    return {t: (*dims[t], shape.num_layers) if t in dims else extra[t] for t in target_modules}


def lora_trainable_params(shape: ModelShape, lora: LoraConfig) -> int:
    """Exactly what peft's `get_nb_trainable_parameters()[0]` reports for this LoraConfig."""
    targets = lora_targets(shape, lora.target_modules)
    adapters = sum(lora_linear_params(i, o, lora.r) * n for i, o, n in targets.values())
    return adapters + _trained_bias_params(shape, lora, targets) + _modules_to_save_params(shape, lora.modules_to_save)


def _trained_bias_params(shape: ModelShape, lora: LoraConfig, targets: dict) -> int:
    """lora.bias "all" trains every bias, "lora_only" those of adapted modules."""
    if lora.bias == "none":
        return 0
    names = [n for n in shape.biased if lora.bias == "all" or n in targets]
    return shape.num_layers * sum(shape.linear_dims()[n][1] for n in names)


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


def param_counts(shape: ModelShape, strategy: str, lora: LoraConfig, quant: QuantizationConfig) -> ParamCounts:
    if strategy == "full":
        return ParamCounts(shape.total_params, 0, 0, shape.largest_layer_params)
    trainable = lora_trainable_params(shape, lora)
    # Adapters and modules_to_save copies come on top of the base; only trained biases leave it.
    frozen = shape.total_params - _trained_bias_params(shape, lora, lora_targets(shape, lora.target_modules))
    if strategy == "lora":
        return ParamCounts(trainable, frozen, 0, shape.largest_layer_params)
    per_layer = sum(
        nf4_tensor_bytes(shape.linear_dims()[n][0] * shape.linear_dims()[n][1], quant.double_quant)
        for n in DECODER_LINEARS
    )
    return ParamCounts(
        trainable, frozen - shape.quantizable_params, shape.num_layers * per_layer, shape.largest_layer_params
    )


# ---------------------------------------------------------------------------------------------------------------
# Memory breakdown


@dataclass(frozen=True)
class Breakdown:
    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    buffers: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    def __add__(self, other: Breakdown) -> Breakdown:
        return Breakdown(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    def scaled(self, factor: float) -> Breakdown:
        return Breakdown(*(a * factor for a in dataclasses.astuple(self)))


@dataclass(frozen=True)
class Placement:
    gpu: Breakdown = Breakdown()
    """Per GPU (per rank)."""
    cpu: Breakdown = Breakdown()
    """CPU RAM per node."""
    nvme: Breakdown = Breakdown()
    """NVMe per node."""

    def __add__(self, other: Placement) -> Placement:
        return Placement(self.gpu + other.gpu, self.cpu + other.cpu, self.nvme + other.nvme)


@dataclass(frozen=True)
class ZeroChoice:
    stage: int
    offload_optimizer: str = "none"
    offload_param: str = "none"


def optimizer_state_bytes(optimizer: str) -> float:
    """Bytes per trained element of the optimizer's own state (beside the fp32 master copy).

    Adam keeps two moments: fp32 in torch/DeepSpeed/paged 32-bit Adam; bitsandbytes 8-bit Adam stores them as uint8
    plus one fp32 absmax per 256-value block each. Under DeepSpeed the optimizer sees flat fp32 groups, so bnb's
    small-tensor fp32 fallback (< 4096 elements) does not apply."""
    return 2 + 2 * 4 / 256 if optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8.0


def model_states(
    counts: ParamCounts,
    zero: ZeroChoice,
    nodes: int,
    gpus_per_node: int,
    precision: str = "bf16",
    optimizer: str = "adamw_torch",
    buffer_factor: float = DS_HOST_BUFFER_FACTOR,
) -> Placement:
    """Parameters, gradients and optimizer states under a ZeRO stage and offload; totals equal DeepSpeed's estimators.

    Per trained element in bf16 with 32-bit Adam: 2 B 16-bit weight; 2 B 16-bit gradient; 12 B optimizer (fp32 master
    4 + two moments 8); on the GPU, DeepSpeed's estimator also reserves the fp32 gradient made at step time: 4 B in
    stages 0-2, 2 B in stage 3 (one sub-group at a time), shown as buffers. With the optimizer offloaded, gradients
    land in an fp32 host partition (4 B); ZeRO-3 also keeps its 16-bit gradient partition on the host (2 B, measured;
    DeepSpeed's estimator leaves it out). Stage 1 partitions the optimizer, stage 2 also the gradients, stage 3 also
    the weights; stage 0 (bf16) keeps everything on every rank. ZeRO-3 adds the largest layer gathered (16-bit weight
    + gradient, 4 B/element). Host memory is DeepSpeed's count times `buffer_factor` (its additional_buffer_factor)
    and covers the load peak — stages 0-2 materialize the whole model on every rank of a node (fp32 in DeepSpeed's
    estimate), ZeRO-3 (zero.Init) one layer — or what is resident, if more. Frozen elements are 16-bit weights only;
    a QLoRA base is counted whole on every GPU, because transformers loads 4-bit models unsharded. DeepSpeed's stage-2
    estimator ignores `num_nodes` for host memory; here each node holds only its ranks' partitions (equal for one)."""
    world = nodes * gpus_per_node
    weight = 2 if precision == "bf16" else 4
    trained, frozen = counts.trainable, counts.frozen
    master = 0 if (precision != "bf16" and zero.stage == 0) else 4  # ZeRO always keeps a separate fp32 partition
    step_buffer = (4 if zero.stage < 3 else 2) if precision == "bf16" else 0
    share = 1 if zero.stage == 0 else world  # ranks sharing the optimizer state
    grad_share = world if zero.stage >= 2 else 1
    param_share = world if zero.stage == 3 else 1

    # A QLoRA base (4-bit and dense parts) is loaded whole on every GPU; other frozen weights partition like the rest.
    frozen_share = 1 if counts.quantized_bytes else param_share
    gpu_params = weight * trained / param_share + weight * frozen / frozen_share + counts.quantized_bytes
    optimizer = (master + optimizer_state_bytes(optimizer)) * trained / share
    where_params = zero.offload_param if zero.stage == 3 else "none"
    where_optimizer = zero.offload_optimizer if zero.stage > 0 else "none"
    rank = _place(Placement(), "params", where_params, gpu_params)
    host_grads16 = 0.0
    if where_optimizer == "none":
        rank = _place(rank, "grads", "none", weight * trained / grad_share)
        rank = _place(rank, "buffers", "none", step_buffer * trained / share)
    else:
        rank = _place(rank, "grads", "none", weight * trained if zero.stage == 1 else 0.0)
        rank = _place(rank, "grads", where_optimizer, 4 * trained / world)
        host_grads16 = weight * trained / world if zero.stage == 3 else 0.0
        rank = _place(rank, "grads", "cpu", host_grads16)
    rank = _place(rank, "optimizer", where_optimizer, optimizer)
    if zero.stage == 3:
        rank = _place(rank, "buffers", "none", 4 * counts.largest_layer)

    per_node = Placement(rank.gpu, rank.cpu.scaled(gpus_per_node), rank.nvme.scaled(gpus_per_node))
    uncounted = host_grads16 * gpus_per_node
    return _host_margin(per_node, _load_peak(counts, zero.stage, gpus_per_node), buffer_factor, uncounted)


def _place(placement: Placement, part: str, device: str, nbytes: float) -> Placement:
    where = {"none": "gpu", "cpu": "cpu", "nvme": "nvme"}[device]
    current = getattr(placement, where)
    moved = dataclasses.replace(current, **{part: getattr(current, part) + nbytes})
    return dataclasses.replace(placement, **{where: moved})


def _load_peak(counts: ParamCounts, stage: int, gpus_per_node: int) -> float:
    """Host bytes per node while loading, as DeepSpeed's estimators assume (fp32, every rank of the node).

    A 4-bit base is quantized while it streams to the GPU, so QLoRA has no host-side copy."""
    if counts.quantized_bytes:
        return 0.0
    elements = counts.largest_layer if stage == 3 else counts.trainable + counts.frozen
    return 4 * elements * gpus_per_node


def _host_margin(placement: Placement, load_peak: float, buffer_factor: float, uncounted: float) -> Placement:
    """Host memory = factor x max(load peak, states as DeepSpeed counts them), at least what is resident; the excess
    over the resident states is shown as buffers."""
    resident = placement.cpu.model_states
    needed = max(resident, buffer_factor * max(load_peak, resident - uncounted))
    cpu = dataclasses.replace(placement.cpu, buffers=placement.cpu.buffers + needed - resident)
    return dataclasses.replace(placement, cpu=cpu)


def activation_bytes(
    shape: ModelShape,
    seq_len: int,
    micro_batch: int,
    checkpointing: bool,
    attn_implementation: str = "sdpa",
    dtype_bytes: int = 2,
    adapters: dict[str, tuple[int, int, int]] | None = None,
    lora_r: int = 0,
) -> int:
    """Peak bytes of activations kept for the backward pass on one GPU.

    Source: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (34·s·b·h +
    5·a·s²·b bytes per layer for GPT), redone tensor by tensor for the Hugging Face Llama decoder — SwiGLU MLP,
    RMSNorm without dropout, rotary embeddings — and checked against the allocation peak of a step on CPU
    (tests/test_plan.py). Per token and layer, with a = bytes of the compute dtype, q = heads·head_dim,
    kv = kv_heads·head_dim, i = intermediate size:

    - each of the 2 RMSNorms: 4h (HF upcasts its input to fp32) + a·h (normalized) + a·h (output, also the input of
      the next projections) + 4 (fp32 rstd); Qwen3's q/k norms likewise on q and kv;
    - attention: a·q (query after RoPE), 2·a·k for key and value, a·q (output, shared with o_proj's input), 4·heads
      (fp32 log-sum-exp). flash_attention_2 keeps k = kv; sdpa with a mask (packing or padding) and eager repeat the
      grouped K/V heads first, k = q. Flash/sdpa kernels keep no s x s scores: Korthikanti's 5·a·s² term is dropped.
      eager adds (4 + a)·heads·s (fp32 softmax output and its cast copy);
    - SwiGLU MLP: 4·a·i (gate, SiLU(gate), up, their product = down_proj's input);
    - each LoRA-adapted projection: 4·in + 4·r (peft keeps adapters in fp32 and casts the input for them).
    Outside the layers: the final norm, RoPE cos/sin (2·a·head_dim), for sdpa/eager an (s x s) mask per sequence,
    and the loss. The loss is the peak: transformers upcasts the logits to fp32 for cross-entropy, so forward holds
    the a·V logits, their fp32 copy and the fp32 log-softmax (a + 8)·V, and backward (dtrain keeps only the loss, so
    the logits are freed by then) the log-softmax output, its gradient and the logits' fp32 gradient, 12·V —
    1.5 MB per token for Llama-3's 128k vocabulary, often more than all the layers.
    With gradient checkpointing each layer keeps only its input (a·h); one layer is recomputed at a time, never
    while the loss peak is alive, so the peak takes the larger of the two.
    With a frozen base (LoRA/QLoRA: `adapters` given) autograd keeps no input that only a weight gradient needs: the
    norms keep 4h + 4 (not their normalized x or output) and the MLP 3·a·i (not down_proj's input); bitsandbytes'
    4-bit matmul keeps no input either. A micro batch's activations do not partition over ZeRO ranks."""
    a, h = dtype_bytes, shape.hidden_size
    layer = _layer_activation_bytes(shape, attn_implementation, a, seq_len, frozen_base=adapters is not None)
    layer += sum(
        4 * fan_in + 4 * lora_r for name, (fan_in, _, _) in (adapters or {}).items() if name in DECODER_LINEARS
    )
    loss = max(a + 8, 12) * shape.vocab_size
    kept = shape.num_layers * (a * h if checkpointing else layer)
    transient = max(loss, layer) if checkpointing else loss
    mask = {"sdpa": 1, "eager": a}.get(attn_implementation, 0) * seq_len
    other = (4 + 2 * a) * h + 4 + 2 * a * shape.head_dim + 16 + mask  # final norm, RoPE, input ids + labels, mask
    return int(micro_batch * seq_len * (kept + transient + other))


def _layer_activation_bytes(
    shape: ModelShape, attn_implementation: str, a: int, seq_len: int, frozen_base: bool
) -> float:
    """Bytes per token that one decoder layer keeps for backward (see activation_bytes)."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    norm = 4 * h + 4 + (0 if frozen_base else 2 * a * h)
    kv_saved = kv if attn_implementation == "flash_attention_2" else q
    attention = 2 * a * q + 2 * a * kv_saved + 4 * shape.num_heads
    if attn_implementation == "eager":
        attention += (4 + a) * shape.num_heads * seq_len
    if shape.qk_norm:
        attention += (4 + 2 * a) * (q + kv)
    return 2 * norm + attention + (3 if frozen_base else 4) * a * i


# ---------------------------------------------------------------------------------------------------------------
# One configuration on given hardware


@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus_per_node: int
    gpu_mem_bytes: int
    """Memory of one GPU."""
    cpu_mem_bytes: int
    """CPU RAM of one node."""
    nvme_bytes: int | None = None
    """Local NVMe of one node; None: not given, NVMe offload is neither checked nor proposed."""

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"hardware: need >= 1 node and GPU per node, got {self.nodes} x {self.gpus_per_node}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Choice:
    """The knobs plan varies."""

    strategy: str
    stage: int
    offload_optimizer: str = "none"
    offload_param: str = "none"
    checkpointing: bool = False

    @classmethod
    def from_config(cls, cfg: Config) -> Choice:
        ds = cfg.deepspeed
        return cls(
            cfg.strategy,
            ds.stage,
            ds.offload_optimizer.device,
            ds.offload_param.device,
            cfg.model.gradient_checkpointing,
        )

    @property
    def cost(self) -> int:
        """Rough % slowdown against plain data parallel; orders configurations from cheapest (see COST_*)."""
        return (
            COST_CHECKPOINTING * self.checkpointing
            + COST_STAGE3 * (self.stage == 3)
            + COST_OFFLOAD_OPTIMIZER[self.offload_optimizer]
            + COST_OFFLOAD_PARAM[self.offload_param]
        )

    @property
    def valid(self) -> bool:
        """The same rules as dtrain.config's validation."""
        return (
            (self.offload_param == "none" or self.stage == 3)
            and (self.offload_optimizer == "none" or self.stage >= 1)
            and not (self.strategy == "qlora" and self.offload_param != "none")
        )

    def describe(self) -> str:
        offload = [
            f"{what} offload {dev}"
            for what, dev in (("optimizer", self.offload_optimizer), ("parameter", self.offload_param))
            if dev != "none"
        ]
        ckpt = "gradient checkpointing " + ("on" if self.checkpointing else "off")
        return ", ".join([self.strategy, f"ZeRO-{self.stage}", *(offload or ["no offload"]), ckpt])


@dataclass(frozen=True)
class Estimate:
    choice: Choice
    memory: Placement
    optimizer: str

    def _short(self, hw: Hardware) -> list[tuple[str, str, float, float]]:
        """(resource, short name, needed, available) for each resource that is short."""
        checks = [
            ("GPU memory per GPU", "GPU", self.memory.gpu.total, hw.gpu_mem_bytes),
            ("CPU RAM per node", "CPU", self.memory.cpu.total, hw.cpu_mem_bytes),
            ("NVMe per node", "NVMe", self.memory.nvme.total, hw.nvme_bytes),
        ]
        return [check for check in checks if check[3] is not None and check[2] > check[3]]

    def problems(self, hw: Hardware) -> list[str]:
        """Every resource that is short, with how much more it needs; empty when the configuration fits."""
        return [
            f"{what}: {format_bytes(need)} needed, {format_bytes(have)} available ({format_bytes(need - have)} short)"
            for what, _, need, have in self._short(hw)
        ]

    def fits(self, hw: Hardware) -> bool:
        return not self._short(hw)

    def shortfall(self, hw: Hardware) -> str:
        """Short verdict for a table cell: fits, or what is short by how much."""
        over = [f"{short} +{format_bytes(need - have)}" for _, short, need, have in self._short(hw)]
        return "no: " + ", ".join(over) if over else "fits"


def _optimizer_for(strategy: str, configured: str) -> str:
    """bitsandbytes optimizers are for adapters: a full fine-tune alternative uses 32-bit AdamW."""
    return "adamw_torch" if strategy == "full" and configured not in ("adamw_torch", "adamw_deepspeed") else configured


def estimate(shape: ModelShape, cfg: Config, choice: Choice, hw: Hardware) -> Estimate:
    """Memory of one configuration: the config with `choice` applied, on `hw`."""
    optimizer = _optimizer_for(choice.strategy, cfg.train.optimizer)
    counts = param_counts(shape, choice.strategy, cfg.lora, cfg.quantization)
    zero = ZeroChoice(choice.stage, choice.offload_optimizer, choice.offload_param)
    states = model_states(counts, zero, hw.nodes, hw.gpus_per_node, cfg.train.precision, optimizer)
    compute = cfg.quantization.compute_dtype if choice.strategy == "qlora" else cfg.train.precision
    adapters = lora_targets(shape, cfg.lora.target_modules) if choice.strategy != "full" else None
    activations = activation_bytes(
        shape,
        cfg.data.seq_len,
        cfg.train.micro_batch_size,
        choice.checkpointing,
        cfg.model.attn_implementation,
        {"bf16": 2, "fp16": 2, "fp32": 4}[compute],
        adapters,
        cfg.lora.r,
    )
    runtime = _runtime_buffers(shape, cfg, choice, counts, hw, 2 if cfg.train.precision == "bf16" else 4)
    return Estimate(choice, states + runtime + Placement(gpu=Breakdown(activations=activations)), optimizer)


def _runtime_buffers(
    shape: ModelShape, cfg: Config, choice: Choice, counts: ParamCounts, hw: Hardware, weight: int
) -> Placement:
    """What DeepSpeed's model-state estimate leaves out: buckets, swap buffers, dequantized 4-bit weights, runtimes."""
    ds, per_node = cfg.deepspeed, hw.gpus_per_node
    gpu = CUDA_RUNTIME_BYTES + (weight * ds.reduce_bucket_size if choice.stage >= 1 else 0)
    if choice.stage == 3:
        gpu += weight * ds.stage3_prefetch_bucket_size
    if choice.strategy == "qlora":  # bnb dequantizes one weight at a time to the compute dtype for its matmul
        gpu += weight * max(shape.linear_dims()[n][0] * shape.linear_dims()[n][1] for n in DECODER_LINEARS)
    cpu = HOST_RUNTIME_BYTES * per_node
    if choice.offload_optimizer == "nvme":  # pinned fp32 swap buffers, one sub-group each
        partition = counts.trainable / hw.world_size
        cpu += DS_OPTIMIZER_SWAP_BUFFERS * 4 * min(DS_SUB_GROUP_SIZE, partition) * per_node
    if choice.offload_param == "nvme":  # each buffer must hold the largest parameter
        elements = max(DS_PARAM_SWAP_BUFFER_ELEMENTS, counts.largest_layer)
        cpu += DS_PARAM_SWAP_BUFFERS * weight * elements * per_node
    return Placement(gpu=Breakdown(buffers=gpu), cpu=Breakdown(buffers=cpu))


# ---------------------------------------------------------------------------------------------------------------
# Alternatives and the cheapest that fits


def candidate_choices(cfg: Config, hw: Hardware) -> list[Choice]:
    """ZeRO 2/3 (and the configured stage) x optimizer offload x parameter offload x checkpointing x strategy.

    NVMe offload is only proposed when the node's NVMe size is given."""
    devices = ("none", "cpu", "nvme") if hw.nvme_bytes is not None else ("none", "cpu")
    stages = sorted({2, 3, cfg.deepspeed.stage})
    grid = itertools.product(STRATEGIES, stages, devices, devices, (False, True))
    choices = {Choice(*values) for values in grid} | {Choice.from_config(cfg)}
    return [c for c in choices if c.valid]


def plan_alternatives(shape: ModelShape, cfg: Config, hw: Hardware) -> list[Estimate]:
    """Every candidate, configured strategy first, then cheapest first (ties: less GPU memory)."""
    order = [cfg.strategy, *(s for s in STRATEGIES if s != cfg.strategy)]
    estimates = [estimate(shape, cfg, c, hw) for c in candidate_choices(cfg, hw)]
    return sorted(estimates, key=lambda e: (order.index(e.choice.strategy), e.choice.cost, e.memory.gpu.total))


def cheapest_fit(estimates: list[Estimate], hw: Hardware) -> Estimate | None:
    """The first that fits in plan_alternatives' order: the configured strategy if anything fits with it — changing
    strategy changes what is trained, so it is the last resort — and the lowest cost within it."""
    return next((e for e in estimates if e.fits(hw)), None)


# ---------------------------------------------------------------------------------------------------------------
# Sizes and rendering

_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50,
}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes from "80GB", "1TB", "24GiB", "1.5 TB", "512G" or a plain number of bytes.

    kB/MB/GB/TB are decimal (10^9); KiB/MiB/GiB/TiB binary (2^30); a bare K/M/G/T is binary, as in Slurm's --mem.
    Note that an "80GB" GPU has 80 GiB: passing 80GB understates it by 7 %, which leaves headroom."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS:
        raise ValueError(f"size {text!r}: expected a number with a unit such as 80GB, 1TB, 24GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Decimal units, three significant digits: 0, 512 MB, 80.0 GB, 1.13 TB."""
    if n < 0.5:
        return "0"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = n / size
            digits = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{value:.{digits}f} {unit}"
    return f"{int(n)} B"


def render_breakdown(est: Estimate, hw: Hardware) -> str:
    """Parts x places table of one configuration, with the capacity and the verdict."""
    mem = est.memory
    rows = [
        (label, getattr(mem.gpu, part), getattr(mem.cpu, part), getattr(mem.nvme, part))
        for label, part in (
            ("parameters", "params"),
            ("gradients", "grads"),
            ("optimizer states", "optimizer"),
            ("activations", "activations"),
            ("buffers", "buffers"),
        )
    ]
    nvme_have = format_bytes(hw.nvme_bytes) if hw.nvme_bytes is not None else "not given"
    lines = [f"  {'':<18}{'per GPU':>12}{'CPU RAM/node':>15}{'NVMe/node':>12}"]
    lines += [
        f"  {label:<18}{format_bytes(g):>12}{format_bytes(c):>15}{format_bytes(n):>12}" for label, g, c, n in rows
    ]
    lines.append(
        f"  {'total':<18}{format_bytes(mem.gpu.total):>12}{format_bytes(mem.cpu.total):>15}"
        f"{format_bytes(mem.nvme.total):>12}"
    )
    lines.append(
        f"  {'available':<18}{format_bytes(hw.gpu_mem_bytes):>12}{format_bytes(hw.cpu_mem_bytes):>15}{nvme_have:>12}"
    )
    return "\n".join(lines)


def verdict(est: Estimate, hw: Hardware) -> str:
    problems = est.problems(hw)
    if problems:
        return "does not fit — " + "; ".join(problems)
    spare = (
        f"{format_bytes(hw.gpu_mem_bytes - est.memory.gpu.total)} spare per GPU, "
        f"{format_bytes(hw.cpu_mem_bytes - est.memory.cpu.total)} spare CPU RAM per node"
    )
    unchecked = "; NVMe use not checked (no NVMe size given)" if est.memory.nvme.total and hw.nvme_bytes is None else ""
    return f"fits — {spare}{unchecked}"


def render_alternatives(estimates: list[Estimate], configured: Choice, best: Estimate | None, hw: Hardware) -> str:
    header = (
        f"    {'strategy':<9}{'ZeRO':>4}  {'opt.offload':<12}{'param.offload':<14}{'ckpt':<5}{'cost':>5}"
        f"{'per GPU':>11}{'CPU/node':>11}{'NVMe/node':>11}  verdict"
    )
    lines = [header]
    for est in estimates:
        c, mem = est.choice, est.memory
        mark = ("*" if c == configured else " ") + (">" if best is not None and est is best else " ")
        lines.append(
            f"  {mark}{c.strategy:<9}{c.stage:>4}  {c.offload_optimizer:<12}{c.offload_param:<14}"
            f"{'on' if c.checkpointing else 'off':<5}{c.cost:>5}{format_bytes(mem.gpu.total):>11}"
            f"{format_bytes(mem.cpu.total):>11}{format_bytes(mem.nvme.total):>11}  {est.shortfall(hw)}"
        )
    lines.append("  * as configured   > cheapest that fits   cost: rough % slowdown (docs/plan.md)")
    return "\n".join(lines)


def render_plan(shape: ModelShape, cfg: Config, hw: Hardware) -> str:
    """The full `dtrain plan` report."""
    configured = Choice.from_config(cfg)
    estimates = plan_alternatives(shape, cfg, hw)
    own = next(e for e in estimates if e.choice == configured)
    best = cheapest_fit(estimates, hw)
    counts = param_counts(shape, cfg.strategy, cfg.lora, cfg.quantization)
    trained = counts.trainable
    nvme = f", {format_bytes(hw.nvme_bytes)} NVMe per node" if hw.nvme_bytes is not None else ", NVMe not given"
    lines = [
        f"model      {cfg.model.path}: {shape.describe()}",
        f"trainable  {trained:,} ({100 * trained / shape.total_params:.3g} % of the base) with {cfg.strategy}",
        f"hardware   {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) = {hw.world_size} ranks; "
        f"{format_bytes(hw.gpu_mem_bytes)} per GPU, {format_bytes(hw.cpu_mem_bytes)} CPU RAM per node{nvme}",
        f"batch      {_batch_line(cfg, hw)}",
        "",
        f"as configured: {configured.describe()} (cost {configured.cost}, optimizer {own.optimizer})",
        render_breakdown(own, hw),
        f"verdict: {verdict(own, hw)}",
        f"cheapest that fits: {_best_line(best, configured)}",
        "",
        "alternatives (configured strategy first, then cheapest first):",
        render_alternatives(estimates, configured, best, hw),
    ]
    return "\n".join(lines)


def _batch_line(cfg: Config, hw: Hardware) -> str:
    micro = f"micro batch {cfg.train.micro_batch_size} x seq_len {cfg.data.seq_len} per GPU"
    try:
        layout = BatchLayout.from_config(cfg.train, hw.world_size)
    except ConfigError as e:
        return f"{micro}; {e.problems[0]}"
    return f"{micro}; global batch {layout.global_batch_size} (accumulation {layout.gradient_accumulation_steps})"


def _best_line(best: Estimate | None, configured: Choice) -> str:
    if best is None:
        return "none of the alternatives below fits this hardware"
    if best.choice == configured:
        return "the configuration as it is"
    return f"{best.choice.describe()} (cost {best.choice.cost} vs {configured.cost} as configured)"


# ---------------------------------------------------------------------------------------------------------------
# Entry points for the CLI (dtrain plan / check / submit)


def plan_command(
    cfg: Config,
    nodes: int,
    gpus_per_node: int,
    gpu_mem_bytes: int,
    cpu_mem_bytes: int,
    nvme_bytes: int | None = None,
) -> str:
    """Text printed by `dtrain plan CONFIG --nodes --gpus-per-node --gpu-mem --cpu-mem [--nvme]`."""
    hw = Hardware(nodes, gpus_per_node, gpu_mem_bytes, cpu_mem_bytes, nvme_bytes)
    return render_plan(load_model_shape(cfg.model.path), cfg, hw)


def fit_problems(cfg: Config, layout: BatchLayout, hardware: Hardware) -> list[str]:
    """Why the configured run cannot fit `hardware`; empty if it fits. For `dtrain check` / `dtrain submit`."""
    if layout.world_size != hardware.world_size:
        return [f"layout: {layout.world_size} ranks but the hardware has {hardware.world_size} GPUs"]
    try:
        shape = load_model_shape(cfg.model.path)
    except (OSError, ValueError, KeyError) as e:
        return [f"model.path: cannot estimate memory from {cfg.model.path}/config.json: {e}"]
    own = estimate(shape, cfg, Choice.from_config(cfg), hardware)
    problems = own.problems(hardware)
    if problems:
        best = cheapest_fit(plan_alternatives(shape, cfg, hardware), hardware)
        hint = best.choice.describe() if best else "nothing in the alternatives of `dtrain plan` fits"
        problems.append(f"cheapest configuration that fits: {hint} (see `dtrain plan`)")
    return problems
