"""strategy: full — every weight trained under ZeRO; exported by consolidating the shards into an HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtrain.plan.shape import ModelShape, ParamCounts, PlanTerms
from dtrain.strategies.protocol import BuiltModel, CheckpointOptions, ExportOptions
from dtrain.tables import OPTIMIZERS

if TYPE_CHECKING:
    import torch

    from dtrain.config import Config
    from dtrain.dist import DistEnv
    from dtrain.export import ExportResult


class Full:
    name = "full"
    export_kinds = ("hf",)
    checkpoint = CheckpointOptions()
    sections = ()

    def config_problems(self, cfg: Config) -> list[str]:
        spec = OPTIMIZERS.get(cfg.train.optimizer)  # an unknown name is reported by the train section
        if spec is not None and spec.adapters_only:
            return [
                f"train.optimizer: {cfg.train.optimizer} is for strategy lora/qlora; full fine-tuning under ZeRO "
                "uses adamw_torch or adamw_deepspeed"
            ]
        return []

    def zero_problems(self, stage: int, offload_optimizer: str, offload_param: str) -> list[str]:
        return []

    def model_problems(self, cfg: Config) -> list[str]:
        return []

    def layout_problems(self, cfg: Config, nnodes: int) -> list[str]:
        return []

    def build(self, cfg: Config, env: DistEnv, ds_config: dict[str, Any]) -> BuiltModel:
        from dtrain.strategies.loading import load_pretrained

        model, keepalive = load_pretrained(cfg, ds_config, env.device)
        return BuiltModel(model, keepalive)

    def export(self, kind: str, checkpoint: Path, cfg: Config, out: Path, options: ExportOptions) -> ExportResult:
        return export_hf(checkpoint, cfg, out, options)

    def eval_model(self, cfg: Config, checkpoint: Path | None, device: torch.device) -> torch.nn.Module:
        from dtrain.export import lazy_engine_tensors
        from dtrain.strategies.loading import load_for_eval, load_trained

        model = load_for_eval(cfg, device)
        if checkpoint is not None:
            load_trained(model, lazy_engine_tensors(checkpoint)[0], checkpoint)
        return model

    def plan_terms(self, shape: ModelShape, cfg: Config) -> PlanTerms:
        optimizer = cfg.train.optimizer
        if OPTIMIZERS[optimizer].adapters_only:  # as an alternative to an adapter run: what full would use
            optimizer = "adamw_torch"
        counts = ParamCounts(shape.total_params, 0, 0, shape.largest_layer_params)
        return PlanTerms(counts, optimizer, cfg.train.precision)


def export_hf(checkpoint: Path, cfg: Config, out: Path, options: ExportOptions) -> ExportResult:
    """Consolidate the shards into an HF directory, one output shard in memory at a time."""
    from dtrain import export

    target = export.export_dtype(options.dtype, cfg.model.local_dir())
    lazy, buffers, shared = export.lazy_engine_tensors(checkpoint)
    aliases = {alias for alias, source in shared if source in lazy}  # tied weights: saved once, as HF does

    def materialize(name: str):
        tensor = lazy[name].contiguous()
        return tensor if name in buffers or not tensor.is_floating_point() else tensor.to(target)

    names = [n for n in lazy if n not in aliases]
    sizes = {n: export.numel(lazy[n]) * (lazy[n].dtype.itemsize if n in buffers else target.itemsize) for n in names}
    peak_anon: list[float] = []
    files = export.write_sharded(
        names, sizes, materialize, out, options.max_shard_bytes, lambda: peak_anon.append(export.anon_mb())
    )
    export.copy_model_files(cfg, out, target)
    peak = max((m for m in peak_anon if m), default=None)
    return export.ExportResult(out, files, len(names), export.peak_rss_mb(), peak)


FULL = Full()
