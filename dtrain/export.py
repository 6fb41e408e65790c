"""`dtrain export`: a complete checkpoint -> files that plain transformers / peft load. No GPU, no process group.

What can be exported depends on the strategy (`Strategy.export_kinds`: adapter and merged for lora/qlora, hf for
full); the strategy writes it, with the readers and writers here:

- finding the checkpoint and the config it was trained with;
- reading trained tensors out of DeepSpeed's files without DeepSpeed running: stage 0-2 keep whole tensors in the
  module state (`mp_rank_00_model_states.pt`); stage 3 keeps `[0]`-shaped placeholders there and the real values
  as fp32 partitions in each rank's optimizer file, which `deepspeed.utils.zero_to_fp32` stitches back together
  lazily (one tensor at a time, the files memory-mapped);
- writing HF's sharded safetensors layout one shard at a time;
- `export_checkpoint`: every requested kind is checked before anything is written, each is built in a temporary
  folder beside its destination and renamed when complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import resource
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtrain import strategies
from dtrain.checkpoint import ENGINE_TAG, STATE_FILE, checkpoint_name, complete_checkpoints
from dtrain.checkpoint_layout import swapped_optimizer_states
from dtrain.config import Config, ConfigError, config_from_dict, read_yaml
from dtrain.hub import HubError
from dtrain.safe_load import load_untrusted, weights_only_loads
from dtrain.strategies.protocol import ExportOptions
from dtrain.tables import torch_dtype

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


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
                wanted = checkpoint_name(int(checkpoint)) if checkpoint.isdigit() else checkpoint
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
    source = checkpoint / "config.yaml"
    try:
        cfg = config_from_dict(read_yaml(source), check_paths=False, source=str(source))
    except ConfigError as e:
        raise ExportError(f"{checkpoint} holds no usable config.yaml: {e}") from e
    if model_path:
        cfg.model.path = model_path
        cfg.model.tokenizer_path = cfg.model.tokenizer_path or model_path
    try:
        found = (cfg.model.local_dir() / "config.json").is_file()
    except HubError as e:
        raise ExportError(str(e)) from None
    if not found:
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
    state = load_untrusted(optim[0], mmap=True)
    return int(state["optimizer_state_dict"]["zero_stage"])


def lazy_engine_tensors(checkpoint: Path) -> tuple[dict[str, Any], set[str], list[list[str]]]:
    """(name -> tensor or lazy tensor, buffer names, [alias, source] pairs of shared parameters).

    Lazy tensors materialize on `.contiguous()`, so a caller holds one at a time. Names are the engine module's.
    """
    ds_dir = checkpoint / ENGINE_TAG
    if swapped_optimizer_states(checkpoint):
        raise ExportError(swapped_optimizer_states(checkpoint))
    stage = zero_stage(checkpoint)
    if stage == 0:
        state = load_untrusted(ds_dir / "mp_rank_00_model_states.pt", mmap=True)
        return dict(state["module"]), _buffer_names(state), _shared(state)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model_file = sorted(ds_dir.glob("*model_states.pt"))[0]
    meta = load_untrusted(model_file, mmap=True)
    # DeepSpeed's reader unpickles with weights_only=False; here every load it makes is weights-only. Its progress
    # prints are noise to a user of `dtrain export`.
    with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()):
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


# ---------------------------------------------------------------------------------------------------------------
# Exporting: check everything, then write each kind into a staging folder and rename it into place


def export_checkpoint(checkpoint: Path, outputs: dict[str, Path], options: ExportOptions) -> list[ExportResult]:
    """Write each `kind -> out` of `outputs` for `checkpoint`. Every kind and output folder is checked first, so a
    request that cannot be done in full writes nothing; a failure while writing removes that kind's staging folder
    and leaves earlier, complete kinds in place."""
    cfg = run_config(checkpoint, options.model_path)
    strategy = strategies.get(cfg.strategy)
    wrong = [kind for kind in outputs if kind not in strategy.export_kinds]
    if wrong:
        kinds = ", ".join(f"--{k}" for k in strategy.export_kinds)
        raise ExportError(f"--{wrong[0]} is not for strategy {cfg.strategy}; this run exports {kinds}")
    resolved = {kind: Path(out).resolve() for kind, out in outputs.items()}
    for kind, out in resolved.items():
        shared = [f"--{other}" for other, other_out in resolved.items() if other_out == out and other != kind]
        if shared:
            raise ExportError(f"--{kind} and {' and '.join(shared)} both write {outputs[kind]}: each export kind "
                              "needs its own output folder")  # fmt: skip
    for out in resolved.values():
        check_output_folder(out)
    results = []
    for kind, out in resolved.items():
        staging = out.with_name(f".tmp-{out.name}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            result = strategy.export(kind, checkpoint, cfg, staging, options)
            if out.exists():
                out.rmdir()  # empty, checked above
            os.rename(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        result.out = out
        results.append(result)
    return results


def check_output_folder(out: Path) -> None:
    """An output folder must be new or empty, and its parent a folder that can hold it."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new directory")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ExportError(f"{out}: {parent} is a file, not a folder")
    if parent is not None and not os.access(parent, os.W_OK):
        raise ExportError(f"{out}: cannot write into {parent}")


def export_dtype(dtype: str, model_path: str) -> torch.dtype:
    """`auto`: the dtype the base model was published in (config.json), else fp32."""
    if dtype != "auto":
        return torch_dtype(dtype)
    config = json.loads((Path(model_path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


def copy_model_files(cfg: Config, out: Path, dtype: torch.dtype) -> None:
    """Everything of the base directory except its weights (config, generation config), then the tokenizer."""
    for item in cfg.model.local_dir().iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and not item.name.endswith(".index.json"):
            shutil.copy2(item, out / item.name)
    config = json.loads((out / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer(cfg, out)


def copy_tokenizer(cfg: Config, out: Path) -> None:
    """The tokenizer, carrying the chat template the training data was rendered with (data.chat_template when set):
    the exported model then renders a conversation exactly as training did."""
    from dtrain.data.chat import training_chat_template

    tokenizer = cfg.model.load_tokenizer()
    tokenizer.chat_template = training_chat_template(cfg, tokenizer)
    tokenizer.save_pretrained(str(out))


def numel(tensor: Any) -> int:
    return int(torch.Size(tensor.shape).numel())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def anon_mb() -> float | None:
    """Anonymous resident memory now (Linux /proc); None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
