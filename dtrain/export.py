"""`dtrain export`: a complete checkpoint -> files that plain transformers / peft load. No GPU, no process group.

    --adapter OUT   lora/qlora: adapter_config.json + adapter_model.safetensors (PEFT format)
    --merged OUT    lora/qlora: base + adapter merged into a standard HF model directory (qlora: onto the
                    dequantized NF4 base, the weights the adapter was trained against)
    --hf OUT        full: the ZeRO shards consolidated into an HF safetensors directory, streamed shard by shard

Where the trained tensors are in a checkpoint's `ds/` folder (DeepSpeed's layout, read without DeepSpeed running):
stage 0-2 keep whole tensors in the module state (`mp_rank_00_model_states.pt`); stage 3 keeps `[0]`-shaped
placeholders there and the real values as fp32 partitions in each rank's optimizer file, which
`deepspeed.utils.zero_to_fp32` stitches back together lazily (one tensor at a time, the files memory-mapped).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import resource
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtrain.checkpoint import ENGINE_TAG, STATE_FILE, complete_checkpoints
from dtrain.config import Config, config_from_dict
from dtrain.model import DTYPES

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; nothing was written."""


@dataclass
class ExportResult:
    out: Path
    files: list[str]
    tensors: int
    peak_rss_mb: float
    """High-water mark of the process's resident memory (ru_maxrss), imports included."""
    peak_anon_mb: float | None = None
    """--hf: the most anonymous memory seen while a shard was held. RSS also counts pages of the memory-mapped
    checkpoint files already read, which are page cache the kernel can reclaim; this is what export itself holds."""

    def summary(self) -> str:
        anon = f", anonymous {self.peak_anon_mb:,.0f} MiB" if self.peak_anon_mb is not None else ""
        files = f"{len(self.files)} file(s)"
        return f"{self.out}: {self.tensors} tensors in {files}; peak RSS {self.peak_rss_mb:,.0f} MiB{anon}"


# ---------------------------------------------------------------------------------------------------------------
# Finding the checkpoint and the run it belongs to


def find_checkpoint(source: str | Path, checkpoint: str | None = None) -> Path:
    """The checkpoint to export. `source`: a run's output_dir, its checkpoints folder, a config YAML, or a
    checkpoint itself. `checkpoint`: None (the newest complete one), a name like step-00000040, a step number,
    or a path."""
    if checkpoint and Path(checkpoint).is_dir():
        found = Path(checkpoint)
    else:
        directory = _checkpoint_dir(Path(source))
        if directory is None:  # source is a checkpoint
            found = Path(source)
        else:
            complete = complete_checkpoints(directory)
            if checkpoint is None:
                if not complete:
                    raise ExportError(f"no complete checkpoint in {directory}")
                found = complete[-1]
            else:
                wanted = f"step-{int(checkpoint):08d}" if checkpoint.isdigit() else checkpoint
                found = directory / wanted
                if found not in complete:
                    names = ", ".join(p.name for p in complete) or "none"
                    raise ExportError(f"{found} is not a complete checkpoint (complete ones: {names})")
    if not (found / STATE_FILE).is_file():
        raise ExportError(f"{found} is not a complete checkpoint (no {STATE_FILE})")
    return found


def _checkpoint_dir(source: Path) -> Path | None:
    if source.is_file():  # a run config
        from dtrain.config import load_config

        return load_config(source, check_paths=False).checkpoint_dir
    if (source / STATE_FILE).is_file():
        return None
    if (source / "checkpoints").is_dir():
        return source / "checkpoints"
    return source


def run_config(checkpoint: Path, model_path: str | None = None) -> Config:
    """The config the checkpoint was trained with (saved next to it); `model_path` when the base has moved."""
    import yaml

    raw = yaml.safe_load((checkpoint / "config.yaml").read_text())
    cfg = config_from_dict(raw, check_paths=False, source=str(checkpoint / "config.yaml"))
    if model_path:
        cfg.model.path = model_path
        cfg.model.tokenizer_path = cfg.model.tokenizer_path or model_path
    if not (Path(cfg.model.path) / "config.json").is_file():
        raise ExportError(f"base model {cfg.model.path} not found (pass --model PATH if it has moved)")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Reading trained tensors out of DeepSpeed's files


def zero_stage(checkpoint: Path) -> int:
    ds_dir = checkpoint / ENGINE_TAG
    if not ds_dir.is_dir():
        raise ExportError(f"{checkpoint} has no DeepSpeed state ({ENGINE_TAG}/)")
    if list(ds_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
        return 3
    optim = sorted(ds_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    if not optim:
        return 0
    state = torch.load(optim[0], map_location="cpu", mmap=True, weights_only=False)
    return int(state["optimizer_state_dict"]["zero_stage"])


def lazy_engine_tensors(checkpoint: Path) -> tuple[dict[str, Any], set[str], list[list[str]]]:
    """(name -> tensor or lazy tensor, buffer names, [alias, source] pairs of shared parameters).

    Lazy tensors materialize on `.contiguous()`, so a caller holds one at a time. Names are the engine module's.
    """
    ds_dir = checkpoint / ENGINE_TAG
    stage = zero_stage(checkpoint)
    if stage == 0:
        state = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=False)
        return dict(state["module"]), _buffer_names(state), _shared(state)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model_file = sorted(ds_dir.glob("*model_states.pt"))[0]
    meta = torch.load(model_file, map_location="cpu", mmap=True, weights_only=False)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints are noise to a user of `dtrain export`
        tensors = get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoint), tag=ENGINE_TAG, exclude_frozen_parameters=True, lazy_mode=True
        )
    if stage < 3:
        # ZeRO-1/2 module state holds the working copy in the training dtype: what the engine computed with.
        tensors.update({k: v for k, v in meta["module"].items() if k in tensors and v.numel() > 0})
    return dict(tensors), _buffer_names(meta), _shared(meta)


def _buffer_names(state: dict) -> set[str]:
    return set(state.get("buffer_names") or [])


def _shared(state: dict) -> list[list[str]]:
    return [list(pair) for pair in (state.get("shared_params") or {}).items()]


def adapter_tensors(cfg: Config, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained adapter (engine names), in the training dtype, checked against the shapes the model implies.

    Raises ExportError listing every missing, unexpected, empty or mis-shaped tensor: a ZeRO-3 save that was not
    gathered writes `[0]`-shaped tensors without complaint, and such an adapter must never reach a user.
    """
    from dtrain.adapters import expected_adapter_shapes

    expected = expected_adapter_shapes(cfg)
    lazy, _, _ = lazy_engine_tensors(checkpoint)
    found = {name: t for name, t in lazy.items() if name in expected or ".lora_" in name or "modules_to_save" in name}
    problems = [f"{name}: missing from the checkpoint" for name in expected if name not in found]
    problems += [f"{name}: not part of this adapter config" for name in found if name not in expected]
    tensors: dict[str, torch.Tensor] = {}
    for name in (n for n in expected if n in found):
        tensor = found[name].contiguous()
        if tensor.numel() == 0:
            problems.append(f"{name}: empty tensor {tuple(tensor.shape)} (an ungathered ZeRO-3 partition?)")
        elif tuple(tensor.shape) != expected[name]:
            problems.append(f"{name}: shape {tuple(tensor.shape)}, expected {expected[name]}")
        else:
            tensors[name] = tensor.to(DTYPES[cfg.train.precision])
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ExportError(f"{checkpoint}: refusing to write a broken adapter:\n{lines}")
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# --adapter


def export_adapter(checkpoint: Path, out: Path, model_path: str | None = None) -> ExportResult:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from dtrain.adapters import meta_peft_model, peft_config

    cfg = _adapter_run(checkpoint, model_path)
    tensors = adapter_tensors(cfg, checkpoint)
    # PEFT's file names drop the adapter name ("lora_A.default.weight" -> "lora_A.weight").
    peft_names = get_peft_model_state_dict(meta_peft_model(cfg), state_dict=tensors)
    _prepare_out(out)
    peft_config(cfg.lora, str(Path(cfg.model.path).resolve())).save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in peft_names.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return ExportResult(out, ["adapter_config.json", ADAPTER_WEIGHTS], len(peft_names), _peak_rss_mb())


# ---------------------------------------------------------------------------------------------------------------
# --merged


def export_merged(
    checkpoint: Path, out: Path, dtype: str = "auto", max_shard_size: str = "5GB", model_path: str | None = None
) -> ExportResult:
    cfg = _adapter_run(checkpoint, model_path)
    tensors = adapter_tensors(cfg, checkpoint)
    merged = merged_model(cfg, tensors)
    target = _export_dtype(dtype, cfg.model.path)
    cast_parameters(merged, target)
    _prepare_out(out)
    merged.save_pretrained(str(out), max_shard_size=max_shard_size, safe_serialization=True)
    _copy_tokenizer(cfg, out)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    return ExportResult(out, files, len(merged.state_dict()), _peak_rss_mb())


def merged_model(cfg: Config, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Base + adapter with the adapter folded into the weights. qlora merges onto `dequantize()` of the NF4 base:
    those are the weights the adapter was trained against (the original bf16 ones differ by the quantization)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from dtrain.adapters import bnb_config, disable_cpu_weight_repacking, peft_config

    if cfg.strategy == "qlora":
        base = AutoModelForCausalLM.from_pretrained(
            cfg.model.path, quantization_config=bnb_config(cfg), dtype=torch.float32
        )
        disable_cpu_weight_repacking(base, torch.device("cpu"))
        base = base.dequantize(dtype=torch.float32)
        base.is_loaded_in_4bit = False
    else:
        base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    model = get_peft_model(base, peft_config(cfg.lora, cfg.model.path))
    result = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if result.unexpected_keys:
        raise ExportError(f"adapter does not fit the model: unexpected {result.unexpected_keys}")
    return model.merge_and_unload()


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters only: `model.to(bf16)` would also round buffers such as rotary `inv_freq` and shift logits."""
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    model.config.dtype = dtype


# ---------------------------------------------------------------------------------------------------------------
# --hf (full)


def export_hf(
    checkpoint: Path, out: Path, dtype: str = "auto", max_shard_size: str = "5GB", model_path: str | None = None
) -> ExportResult:
    """Consolidate a full run's shards into an HF directory, one output shard in memory at a time."""
    cfg = run_config(checkpoint, model_path)
    if cfg.strategy != "full":
        raise ExportError(f"--hf is for strategy full; this run is {cfg.strategy}: use --adapter or --merged")
    target = _export_dtype(dtype, cfg.model.path)
    lazy, buffers, shared = lazy_engine_tensors(checkpoint)
    aliases = {alias for alias, source in shared if source in lazy}  # tied weights: saved once, as HF does

    def materialize(name: str) -> torch.Tensor:
        tensor = lazy[name].contiguous()
        return tensor if name in buffers or not tensor.is_floating_point() else tensor.to(target)

    names = [n for n in lazy if n not in aliases]
    sizes = {n: _numel(lazy[n]) * (_itemsize(lazy[n]) if n in buffers else target.itemsize) for n in names}
    _prepare_out(out)
    peak_anon: list[float] = []
    files = write_sharded(
        names, sizes, materialize, out, parse_size(max_shard_size), lambda: peak_anon.append(_anon_mb())
    )
    _copy_model_files(cfg, out, target)
    return ExportResult(out, files, len(names), _peak_rss_mb(), max((m for m in peak_anon if m), default=None))


def write_sharded(
    names: list[str],
    sizes: dict[str, int],
    materialize: Callable[[str], torch.Tensor],
    out: Path,
    max_shard_bytes: int,
    on_shard: Callable[[], None] | None = None,
) -> list[str]:
    """Write tensors in HF's sharded safetensors layout; only the shard being written is held in memory.
    `on_shard` is called while each shard is still held (to measure memory)."""
    from safetensors.torch import save_file

    shards = list(_plan_shards(names, sizes, max_shard_bytes))
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for shard, filename in zip(shards, files, strict=True):
        tensors = {name: materialize(name) for name in shard}
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        if on_shard:
            on_shard()
        weight_map.update(dict.fromkeys(shard, filename))
        del tensors
        gc.collect()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def _plan_shards(names: list[str], sizes: dict[str, int], max_bytes: int) -> Iterator[list[str]]:
    shard: list[str] = []
    total = 0
    for name in names:
        if shard and total + sizes[name] > max_bytes:
            yield shard
            shard, total = [], 0
        shard.append(name)
        total += sizes[name]
    if shard or not names:
        yield shard


def parse_size(text: str | int) -> int:
    """'5GB' -> bytes (decimal units, as transformers reads max_shard_size); 'MiB'/'GiB' are binary."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _adapter_run(checkpoint: Path, model_path: str | None) -> Config:
    cfg = run_config(checkpoint, model_path)
    if cfg.strategy == "full":
        raise ExportError("--adapter and --merged are for strategy lora/qlora; this run is full: use --hf")
    return cfg


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)


def _export_dtype(dtype: str, model_path: str) -> torch.dtype:
    """`auto`: the dtype the base model was published in (config.json), else fp32."""
    if dtype != "auto":
        return _EXPORT_DTYPES[dtype]
    config = json.loads((Path(model_path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


def _copy_model_files(cfg: Config, out: Path, dtype: torch.dtype) -> None:
    """Everything of the base directory except its weights (config, generation config), then the tokenizer."""
    for item in Path(cfg.model.path).iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and not item.name.endswith(".index.json"):
            shutil.copy2(item, out / item.name)
    config = json.loads((out / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_tokenizer(cfg, out)


def _copy_tokenizer(cfg: Config, out: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(cfg.tokenizer_path).save_pretrained(str(out))


def _numel(tensor: Any) -> int:
    return int(torch.Size(tensor.shape).numel())


def _itemsize(tensor: Any) -> int:
    return tensor.dtype.itemsize


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _anon_mb() -> float | None:
    """Anonymous resident memory now (Linux /proc); None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
