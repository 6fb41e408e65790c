"""Base + LoRA adapter -> a merged HF model, one base tensor at a time (bounded memory, CPU only).

Loading the whole base to merge (peft's `merge_and_unload`) holds it in fp32: ~280 GB for a 70B model, and a QLoRA
base loaded through bitsandbytes lands on `cuda:0` on a GPU machine. Here the base's safetensors files are read
tensor by tensor (memory-mapped); an adapted weight W becomes W + s * B @ A computed in fp32 (s: alpha / r, or
alpha / sqrt(r) with rsLoRA; DoRA then rescales each output row to its trained magnitude, as peft's merge does), then
cast to the output dtype (default: the base's own dtype); the output is written shard by shard, so the most held at once
is one output shard plus one fp32 weight. qlora merges onto dequantize(quantize_nf4(W)): the weights the adapter was
trained against (the original W differs from them by the quantization error).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"
DORA_MAGNITUDE = f".lora_magnitude_vector.{ADAPTER_NAME}.weight"


def base_tensor_files(model_path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded or not)."""
    model_path = Path(model_path)
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_path / file for name, file in weight_map.items()}
    single = model_path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_path}: no model.safetensors(.index.json); merging needs safetensors")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


class Merger:
    """Yields merged tensors by base name; `materialize(name)` reads, merges and casts one tensor."""

    def __init__(self, model_path: str | Path, adapter: dict[str, torch.Tensor], scale: float, dtype: torch.dtype,
                 nf4: dict[str, Any] | None = None):  # fmt: skip
        """`adapter`: engine-named adapter tensors (peft names); `scale`: peft's scaling (lora.scale); `nf4`: for
        qlora, the quantization (quant_type, blocksize, compress_statistics) the base was trained under."""
        self.files = base_tensor_files(model_path)
        self.dtype, self.scale, self.nf4 = dtype, scale, nf4
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        self.magnitude: dict[str, torch.Tensor] = {}  # DoRA
        for name, tensor in adapter.items():
            plain = name.removeprefix(PEFT_PREFIX)
            if plain.endswith(DORA_MAGNITUDE):
                self.magnitude[plain.removesuffix(DORA_MAGNITUDE) + ".weight"] = tensor
            elif f".lora_A.{ADAPTER_NAME}." in plain:
                target = plain.replace(f".lora_A.{ADAPTER_NAME}.", ".")
                self.lora[target] = (tensor, adapter[name.replace(".lora_A.", ".lora_B.")])
            elif f".modules_to_save.{ADAPTER_NAME}." in plain:
                self.replaced[plain.replace(f".modules_to_save.{ADAPTER_NAME}.", ".")] = tensor
            elif ".lora_B." not in plain:  # a trained bias (lora.bias all / lora_only)
                self.replaced[plain] = tensor
        unknown = sorted((self.lora.keys() | self.replaced.keys() | self.magnitude.keys()) - self.files.keys())
        if unknown:
            raise KeyError(f"adapter tensors with no base tensor to merge into: {unknown[:5]}")
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def sizes(self) -> dict[str, int]:
        """Bytes each tensor takes in the output (floating point in the output dtype)."""
        sizes = {}
        for name, path in self.files.items():
            piece = self._file(path).get_slice(name)
            numel = int(torch.Size(piece.get_shape()).numel())
            floating = piece.get_dtype() in ("F32", "BF16", "F16", "F64")
            sizes[name] = numel * (self.dtype.itemsize if floating else _ITEMSIZE.get(piece.get_dtype(), 8))
        return sizes

    def materialize(self, name: str) -> torch.Tensor:
        tensor = self._file(self.files[name]).get_tensor(name)
        if not tensor.is_floating_point():
            return tensor
        if name in self.replaced:
            return self.replaced[name].to(self.dtype)
        weight = self._trained_against(name, tensor.float())
        if name in self.lora:
            lora_a, lora_b = self.lora[name]
            weight += self.scale * (lora_b.float() @ lora_a.float())
        if name in self.magnitude:  # peft's DoRA merge: magnitude / ||W + s B A|| per output row, times W + s B A
            weight *= (self.magnitude[name].float() / torch.linalg.norm(weight, dim=1)).view(-1, 1)
        return weight.to(self.dtype)

    def _trained_against(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """qlora: every decoder linear was 4-bit in training (adapted or not); embeddings, norms, lm_head were not."""
        from dtrain.plan.shape import DECODER_LINEARS

        if self.nf4 is None or not any(name.endswith(f".{linear}.weight") for linear in DECODER_LINEARS):
            return weight
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(weight, **self.nf4)
        return bnbf.dequantize_4bit(packed, state).float()

    def _file(self, path: Path):
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = self._stack.enter_context(safe_open(str(path), "pt"))
        return self._handles[path]

    def close(self) -> None:
        self._stack.close()


_ITEMSIZE = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def merge_to(
    merger: Merger,
    out: Path,
    max_shard_bytes: int,
    write_sharded: Callable[..., list[str]],
    on_shard: Callable[[], None] | None = None,
) -> list[str]:
    """Write every merged tensor to `out` in HF's sharded layout (tied lm_head: the base file's own layout)."""
    try:
        return write_sharded(merger.names, merger.sizes(), merger.materialize, out, max_shard_bytes, on_shard)
    finally:
        merger.close()


def nf4_settings(quant_type: str, double_quant: bool) -> dict[str, Any]:
    """bitsandbytes' quantize_4bit arguments matching how transformers quantizes a Linear4bit weight at load."""
    return {"quant_type": quant_type, "blocksize": 64, "compress_statistics": double_quant}
