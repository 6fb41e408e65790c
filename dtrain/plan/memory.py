"""Memory of one configuration in five parts (parameters, gradients, optimizer states, activations, buffers), per
GPU, per node's CPU RAM and per node's NVMe. Model states equal DeepSpeed's own estimators (a test compares them).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dtrain.plan.shape import DECODER_LINEARS, ModelShape, ParamCounts
from dtrain.tables import OPTIMIZERS

# DeepSpeed's estimators multiply host memory by this "additional_buffer_factor" (pinned staging, fragmentation).
DS_HOST_BUFFER_FACTOR = 1.5
# Rough allowances DeepSpeed's model-state estimate leaves out. Not measurable on our CPU-only machines: they are
# deliberately round numbers, listed under "buffers" so a user can see and discount them.
CUDA_RUNTIME_BYTES = 1_000_000_000  # per GPU process: CUDA context, cuBLAS workspace, NCCL channels
HOST_RUNTIME_BYTES = 3_000_000_000  # per rank in CPU RAM: Python, torch/CUDA libraries, data loader


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


def model_states(
    counts: ParamCounts,
    zero: ZeroChoice,
    nodes: int,
    gpus_per_node: int,
    precision: str = "bf16",
    optimizer: str = "adamw_torch",
    buffer_factor: float = DS_HOST_BUFFER_FACTOR,
    grad_bytes: int | None = None,
    optimizer_states: str = "fp32",
) -> Placement:
    """Parameters, gradients and optimizer states under a ZeRO stage and offload; totals equal DeepSpeed's estimators.

    Per trained element in bf16 with 32-bit Adam: 2 B 16-bit weight; 4 B gradient (dtrain's DeepSpeed config
    accumulates in fp32 at stages 1-3, dtrain.ds_config; 2 B at stage 0, which bf16 cannot use); 12 B optimizer
    (fp32 master 4 + two moments 8); on the GPU, DeepSpeed's estimator also reserves the fp32 gradient made at step
    time: 4 B in stages 0-2, 2 B in stage 3 (one sub-group at a time), shown as buffers. With the optimizer
    offloaded, gradients land in an fp32 host partition (4 B); ZeRO-3 also keeps its gradient accumulation
    partition on the host (4 B, measured; DeepSpeed's estimator leaves it out). Stage 1 partitions the optimizer,
    stage 2 also the gradients, stage 3 also
    the weights; stage 0 (bf16) keeps everything on every rank. ZeRO-3 adds the largest layer gathered (16-bit weight
    + gradient, 4 B/element). Host memory is DeepSpeed's count times `buffer_factor` (its additional_buffer_factor)
    and covers the load peak — stages 0-2 materialize the whole model on every rank of a node (fp32 in DeepSpeed's
    estimate), ZeRO-3 (zero.Init) one layer — or what is resident, if more. Frozen elements are 16-bit weights only;
    a QLoRA base is counted whole on every GPU, because transformers loads 4-bit models unsharded. DeepSpeed's stage-2
    estimator ignores `num_nodes` for host memory; here each node holds only its ranks' partitions (equal for one).
    `optimizer_states` bf16 (train.optimizer_states) halves the offloaded master (2 B), moments (4 B) and gradient
    partition (2 B)."""
    world = nodes * gpus_per_node
    weight = 2 if precision == "bf16" else 4
    trained, frozen = counts.trainable, counts.frozen
    master = 0 if (precision != "bf16" and zero.stage == 0) else 4  # ZeRO always keeps a separate fp32 partition
    states_scale = 0.5 if optimizer_states == "bf16" else 1.0  # master, moments, offloaded gradient in bf16
    step_buffer = (4 if zero.stage < 3 else 2) if precision == "bf16" else 0
    # dtrain accumulates in fp32 at stages 1-3 (data_types.grad_accum_dtype); DeepSpeed's estimators assume the
    # model dtype (grad_bytes=2 reproduces them).
    grad = grad_bytes or (4 if zero.stage >= 1 else weight)
    share = 1 if zero.stage == 0 else world  # ranks sharing the optimizer state
    grad_share = world if zero.stage >= 2 else 1
    param_share = world if zero.stage == 3 else 1

    # A QLoRA base (4-bit and dense parts) is loaded whole on every GPU; other frozen weights partition like the rest.
    frozen_share = 1 if counts.quantized_bytes else param_share
    gpu_params = weight * trained / param_share + weight * frozen / frozen_share + counts.quantized_bytes
    optimizer = states_scale * (master + OPTIMIZERS[optimizer].state_bytes) * trained / share
    where_params = zero.offload_param if zero.stage == 3 else "none"
    where_optimizer = zero.offload_optimizer if zero.stage > 0 else "none"
    rank = _place(Placement(), "params", where_params, gpu_params)
    host_grads16 = 0.0
    if where_optimizer == "none":
        rank = _place(rank, "grads", "none", grad * trained / grad_share)
        rank = _place(rank, "buffers", "none", step_buffer * trained / share)
    else:
        rank = _place(rank, "grads", "none", grad * trained if zero.stage == 1 else 0.0)
        rank = _place(rank, "grads", where_optimizer, states_scale * 4 * trained / world)
        host_grads16 = grad * trained / world if zero.stage == 3 else 0.0
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
    chunked_loss: bool = True,
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
    and the loss, `plain_loss_bytes` per token — 1.5 MB for Llama-3's 128k vocabulary, often more than all the
    layers. dtrain computes it chunked where that needs less (dtrain.loss; `chunked_loss`): `chunked_loss_bytes`.
    With gradient checkpointing each layer keeps only its input (a·h); one layer is recomputed at a time, never
    while the loss peak is alive, so the peak takes the larger of the two.
    With a frozen base (LoRA/QLoRA: `adapters` given) autograd keeps no input that only a weight gradient needs: the
    norms keep 4h + 4 (not their normalized x or output) and the MLP 3·a·i (not down_proj's input); bitsandbytes'
    4-bit matmul keeps no input either. A micro batch's activations do not partition over ZeRO ranks."""
    a, h = dtype_bytes, shape.hidden_size
    adapted = sum(
        4 * fan_in + 4 * lora_r for name, (fan_in, _, _) in (adapters or {}).items() if name in DECODER_LINEARS
    )
    frozen_base = adapters is not None
    dense = _layer_activation_bytes(shape, attn_implementation, a, seq_len, frozen_base) + adapted
    sparse = (
        _layer_activation_bytes(shape, attn_implementation, a, seq_len, frozen_base, True)
        + adapted
        + _expert_adapter_bytes(shape, a, adapters or {}, micro_batch * seq_len)
        if shape.moe
        else 0
    )
    layer = max(dense if shape.dense_layers else 0, sparse)
    tokens = micro_batch * seq_len
    # LoRA/QLoRA: plan counts the head frozen (lora.modules_to_save: [lm_head] would train it)
    chunks = loss_chunks(shape, a, tokens, frozen_base, head_trained=not frozen_base) if chunked_loss else 1
    loss = chunked_loss_bytes(shape, a, tokens, chunks, head_trained=not frozen_base)
    kept = shape.num_layers * a * h if checkpointing else shape.dense_layers * dense + shape.sparse_layers * sparse
    transient = max(loss, layer * tokens) if checkpointing else loss
    mask = {"sdpa": 1, "eager": a}.get(attn_implementation, 0) * seq_len
    other = (4 + 2 * a) * h + 4 + 2 * a * shape.head_dim + 16 + mask  # final norm, RoPE, input ids + labels, mask
    return int(tokens * (kept + other) + transient)


def plain_loss_bytes(vocab_size: int, dtype_bytes: int) -> int:
    """Bytes per token of transformers' loss at its peak: it upcasts the logits to fp32 for cross-entropy, so
    forward holds the a·V logits, their fp32 copy and the fp32 log-softmax, (a + 8)·V; backward (dtrain keeps only
    the loss, so the logits are freed by then) the log-softmax output, its gradient and the logits' fp32 gradient,
    12·V."""
    return max(dtype_bytes + 8, 12) * vocab_size


def chunked_loss_bytes(shape: ModelShape, dtype_bytes: int, tokens: int, chunks: int, head_trained: bool) -> int:
    """Peak bytes of the loss of `tokens` computed in `chunks` slices (dtrain.loss; 1: the plain loss): one slice's
    `plain_loss_bytes` at a time, plus — when the LM head is trained and there are several slices — two head-sized
    gradients, as autograd sums the slices' lm_head gradients (the running sum and the next slice's)."""
    head_gradients = 2 * shape.vocab_size * shape.hidden_size * dtype_bytes if head_trained and chunks > 1 else 0
    return plain_loss_bytes(shape.vocab_size, dtype_bytes) * math.ceil(tokens / chunks) + head_gradients


def loss_chunks(shape: ModelShape, dtype_bytes: int, tokens: int, frozen_base: bool, head_trained: bool) -> int:
    """Slices of dtrain's chunked cross-entropy for micro batches of `tokens` (dtrain.loss): the fewest that make one
    slice's loss no larger than what one decoder layer keeps for backward (per token) — then the loss is never the
    activation peak (with checkpointing the peak is one layer's recomputation, without it all layers together) and
    more slices would only add calls of the LM head. sdpa's layer is the measure (eager keeps more), erring towards
    more slices. 1 (the plain loss) where chunking would not need less memory: few tokens and a trained head."""
    layer = _layer_activation_bytes(shape, "sdpa", dtype_bytes, seq_len=0, frozen_base=frozen_base)
    chunks = math.ceil(plain_loss_bytes(shape.vocab_size, dtype_bytes) / layer)
    plain = chunked_loss_bytes(shape, dtype_bytes, tokens, 1, head_trained)
    return chunks if chunks > 1 and chunked_loss_bytes(shape, dtype_bytes, tokens, chunks, head_trained) < plain else 1


def _layer_activation_bytes(
    shape: ModelShape, attn_implementation: str, a: int, seq_len: int, frozen_base: bool, sparse: bool = False
) -> float:
    """Bytes per token that one decoder layer keeps for backward (see activation_bytes); `sparse`: a layer whose
    MLP is the router and experts (`_sparse_block_bytes`)."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    norm = 4 * h + 4 + (0 if frozen_base else 2 * a * h)
    kv_saved = kv if attn_implementation == "flash_attention_2" else q
    attention = 2 * a * q + 2 * a * kv_saved + 4 * shape.num_heads
    if attn_implementation == "eager":
        attention += (4 + a) * shape.num_heads * seq_len
    if shape.qk_norm:  # like the layer norms: a frozen norm weight needs neither its normalized input nor output
        attention += (4 + (0 if frozen_base else 2 * a)) * (q + kv)
    mlp = _sparse_block_bytes(shape, a, frozen_base) if sparse else (3 if frozen_base else 4) * a * i
    return 2 * norm + attention + mlp


def _expert_adapter_bytes(shape: ModelShape, a: int, adapters: dict, tokens: int) -> float:
    """Per token, what LoRA on a sparse layer's expert tensors adds (peft's ParamWrapper, measured on CPU): each
    forward materializes the adapted weight W + BA of every expert in the compute dtype, kept for backward — a whole
    dense copy of the layer's adapted experts, whatever the tokens (spread over them here) — and each routed
    token's input and SiLU product are kept again for the adapters' gradients."""
    from dtrain.plan.shape import EXPERT_DOWN, EXPERT_GATE_UP

    adapted = [name for name in (EXPERT_GATE_UP, EXPERT_DOWN) if name in adapters]
    if not adapted:
        return 0.0
    moe, h = shape.moe, shape.hidden_size
    weights = sum(fan_in * fan_out * moe.num_experts for fan_in, fan_out, _ in (adapters[n] for n in adapted))
    return a * weights / tokens + moe.experts_per_token * a * (h + moe.expert_intermediate_size)


def _sparse_block_bytes(shape: ModelShape, a: int, frozen_base: bool) -> float:
    """Per token, what a sparse block keeps for backward (transformers 5's experts loop, Qwen3MoeExperts.forward):
    the router's logits (a·E) and fp32 probabilities (4·E), and for each of the top-k experts the token is routed
    to: its gathered input (a·h, for the weight gradient), gate and up (2·a·I), SiLU(gate) (a·I), their product
    (a·I, down's input) and down's output (a·h, for the routing weight's gradient). A frozen base keeps only what
    the input gradient needs: gate, up and SiLU(gate). Shared experts are a dense MLP beside them."""
    moe = shape.moe
    h, e, k, i = shape.hidden_size, moe.num_experts, moe.experts_per_token, moe.expert_intermediate_size
    routed = 3 * a * i if frozen_base else a * (2 * h + 4 * i)
    shared = (3 if frozen_base else 4) * a * moe.shared_intermediate_size
    return (a + 4) * e + k * routed + shared
