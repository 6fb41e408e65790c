"""What a strategy is: everything that differs between full fine-tuning, LoRA and QLoRA, behind one Protocol.

The trainer, the checkpointer, export, the planner and the launcher's checks ask the strategy named by
`cfg.strategy` (`dtrain.strategies.get`) and never compare strategy names themselves. A new strategy (DoRA, full
fine-tuning of selected layers) is one module implementing this Protocol, registered in `dtrain/strategies/__init__`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from dtrain.config import Config
    from dtrain.dist import DistEnv
    from dtrain.export import ExportResult
    from dtrain.plan.shape import ModelShape, PlanTerms


@dataclass
class BuiltModel:
    module: torch.nn.Module
    keepalive: Any = None
    """transformers finds the ZeRO-3 config through a weak global reference: it must outlive the model."""


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "auto"
    """Dtype of exported parameters; auto: the base model's (config.json)."""
    max_shard_bytes: int = 5 * 10**9
    model_path: str | None = None
    """The base model folder when it has moved since training."""


@dataclass(frozen=True)
class CheckpointOptions:
    save: dict[str, Any] = field(default_factory=dict)
    """Extra kwargs for engine.save_checkpoint (e.g. exclude_frozen_parameters for adapters)."""
    load: dict[str, Any] = field(default_factory=dict)
    """Extra kwargs for engine.load_checkpoint."""


class Strategy(Protocol):
    name: str
    export_kinds: tuple[str, ...]
    """What `dtrain export` can write for a run of this strategy (adapter, merged, hf)."""
    checkpoint: CheckpointOptions
    sections: tuple[str, ...]
    """Strategy-specific config sections it reads (lora, quantization): a resumed run compares only those."""

    def config_problems(self, cfg: Config) -> list[str]:
        """Config rules of this strategy (allowed optimizers, sections it needs), each naming its key."""
        ...

    def zero_problems(self, stage: int, offload_optimizer: str, offload_param: str) -> list[str]:
        """ZeRO layouts this strategy cannot run (beyond what DeepSpeed itself cannot)."""
        ...

    def model_problems(self, cfg: Config) -> list[str]:
        """Problems only the model's shape reveals (config.json, meta device; no weights loaded)."""
        ...

    def layout_problems(self, cfg: Config, nnodes: int) -> list[str]:
        """Problems of the launch layout (e.g. more than one node)."""
        ...

    def build(self, cfg: Config, env: DistEnv, ds_config: dict[str, Any]) -> BuiltModel:
        """The model of one rank, ready for deepspeed.initialize."""
        ...

    def export(self, kind: str, checkpoint: Path, cfg: Config, out: Path, options: ExportOptions) -> ExportResult:
        """Write `kind` (one of export_kinds) of `checkpoint` into the empty staging folder `out`."""
        ...

    def eval_model(self, cfg: Config, checkpoint: Path | None, device: torch.device) -> torch.nn.Module:
        """The model `checkpoint` holds (None: the base as this strategy trains on it, i.e. as at step 0), whole in
        one process without a process group, on `device`, in eval mode (`dtrain eval`)."""
        ...

    def plan_terms(self, shape: ModelShape, cfg: Config) -> PlanTerms:
        """What the planner counts for this strategy: parameters by storage, optimizer, compute dtype."""
        ...
