"""The configurations plan compares (strategy x ZeRO stage x offload x checkpointing), the memory of each, and the
cheapest that fits the hardware."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from dtrain import strategies
from dtrain.config import Config, zero_layout_problems
from dtrain.ds_config import PARAM_SWAP_BUFFERS, param_swap_buffer_elements
from dtrain.plan.hardware import Hardware
from dtrain.plan.memory import (
    CUDA_RUNTIME_BYTES,
    HOST_RUNTIME_BYTES,
    Breakdown,
    Placement,
    ZeroChoice,
    activation_bytes,
    model_states,
)
from dtrain.plan.shape import CHUNKABLE_MODEL_TYPES, ModelShape, ParamCounts
from dtrain.tables import dtype_bytes
from dtrain.units import format_bytes

# How much slower each remedy makes a step, in rough percent. Only the order matters: it decides which fitting
# configuration is "cheapest". Recomputation costs one extra forward (~1/3 of forward+backward FLOPs); the ZeRO/offload
# ladder follows DeepSpeed's speed order as documented by Hugging Face (stage 2 > stage 2 + optimizer offload >
# stage 3 > stage 3 + offloads); NVMe is slower than CPU RAM. See docs/plan.md.
COST_CHECKPOINTING = 33
COST_STAGE3 = 15
COST_OFFLOAD_OPTIMIZER = {"none": 0, "cpu": 10, "nvme": 50}
COST_OFFLOAD_PARAM = {"none": 0, "cpu": 50, "nvme": 150}


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
        """The rules the config validation applies: which layouts DeepSpeed runs, and what the strategy allows."""
        layout = (self.stage, self.offload_optimizer, self.offload_param)
        return not zero_layout_problems(*layout) and not strategies.get(self.strategy).zero_problems(*layout)

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


def estimate(shape: ModelShape, cfg: Config, choice: Choice, hw: Hardware) -> Estimate:
    """Memory of one configuration: the config with `choice` applied, on `hw`."""
    terms = strategies.get(choice.strategy).plan_terms(shape, cfg)
    zero = ZeroChoice(choice.stage, choice.offload_optimizer, choice.offload_param)
    states = model_states(
        terms.counts,
        zero,
        hw.nodes,
        hw.gpus_per_node,
        cfg.train.precision,
        terms.optimizer,
        optimizer_states=cfg.train.optimizer_states if zero.offload_optimizer != "none" else "fp32",
    )
    activations = activation_bytes(
        shape,
        cfg.data.seq_len,
        cfg.train.micro_batch_size,
        choice.checkpointing,
        # auto's flash_attention_2 keeps less than sdpa (no mask, grouped K/V): plan counts sdpa, an upper bound
        "sdpa" if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation,
        dtype_bytes(terms.compute_dtype),
        terms.adapters,
        cfg.lora.r,
        chunked_loss=shape.model_type in CHUNKABLE_MODEL_TYPES,
    )
    runtime = _runtime_buffers(cfg, choice, terms.counts, terms.dequantized_elements, hw)
    return Estimate(choice, states + runtime + Placement(gpu=Breakdown(activations=activations)), terms.optimizer)


def _runtime_buffers(
    cfg: Config, choice: Choice, counts: ParamCounts, dequantized_elements: int, hw: Hardware
) -> Placement:
    """What DeepSpeed's model-state estimate leaves out: buckets, swap buffers, dequantized 4-bit weights, runtimes."""
    ds, per_node, weight = cfg.deepspeed, hw.gpus_per_node, dtype_bytes(cfg.train.precision)
    gpu = CUDA_RUNTIME_BYTES + (weight * ds.reduce_bucket_size if choice.stage >= 1 else 0)
    if choice.stage == 3:
        gpu += weight * ds.stage3_prefetch_bucket_size
    gpu += weight * dequantized_elements  # bnb dequantizes one weight at a time for its matmul
    cpu = HOST_RUNTIME_BYTES * per_node
    if choice.offload_param == "nvme":  # pinned buffers as generated: each holds a rank's share of the largest layer
        elements = param_swap_buffer_elements(counts.largest_layer, hw.world_size)
        cpu += PARAM_SWAP_BUFFERS * weight * elements * per_node
    return Placement(gpu=Breakdown(buffers=gpu), cpu=Breakdown(buffers=cpu))


# ---------------------------------------------------------------------------------------------------------------
# Alternatives and the cheapest that fits


def candidate_choices(cfg: Config, hw: Hardware) -> list[Choice]:
    """ZeRO 2/3 (and the configured stage) x optimizer offload x parameter offload x checkpointing x strategy.

    NVMe offload is only proposed when the node's NVMe size is given."""
    devices = ("none", "cpu", "nvme") if hw.nvme_bytes is not None else ("none", "cpu")
    stages = sorted({2, 3, cfg.deepspeed.stage})
    grid = itertools.product(strategies.NAMES, stages, devices, devices, (False, True))
    choices = {Choice(*values) for values in grid} | {Choice.from_config(cfg)}
    return [c for c in choices if c.valid]


def plan_alternatives(shape: ModelShape, cfg: Config, hw: Hardware) -> list[Estimate]:
    """Every candidate, configured strategy first, then cheapest first (ties: less GPU memory)."""
    order = [cfg.strategy, *(s for s in strategies.NAMES if s != cfg.strategy)]
    estimates = [estimate(shape, cfg, c, hw) for c in candidate_choices(cfg, hw)]
    configured = Choice.from_config(cfg)  # at equal cost, keep what the user chose rather than propose a change
    return sorted(
        estimates,
        key=lambda e: (order.index(e.choice.strategy), e.choice.cost, e.choice != configured, e.memory.gpu.total),
    )


def cheapest_fit(estimates: list[Estimate], hw: Hardware) -> Estimate | None:
    """The first that fits in plan_alternatives' order: the configured strategy if anything fits with it — changing
    strategy changes what is trained, so it is the last resort — and the lowest cost within it."""
    return next((e for e in estimates if e.fits(hw)), None)
