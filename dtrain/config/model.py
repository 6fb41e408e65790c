"""Config sections of the model: which weights, and how the adapters and the 4-bit base are set up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dtrain.tables import DTYPES


@dataclass
class ModelConfig:
    path: str = ""
    """Local Hugging Face model directory (config.json, safetensors, tokenizer files). No hub downloads."""
    tokenizer_path: str | None = None
    """Tokenizer directory when it is not the model directory."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less activation memory, ~30 % more compute."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers. flash_attention_2 needs CUDA and the flash-attn package."""

    def problems(self, check_paths: bool) -> list[str]:
        problems = []
        if not self.path:
            problems.append("model.path: required (a local Hugging Face model directory)")
        elif check_paths and not (Path(self.path) / "config.json").is_file():
            problems.append(f"model.path: {self.path} has no config.json (expected a Hugging Face model directory)")
        if check_paths and self.tokenizer_path and not Path(self.tokenizer_path).is_dir():
            problems.append(f"model.tokenizer_path: {self.tokenizer_path} is not a directory")
        return problems


@dataclass
class LoraConfig:
    r: int = 16
    """Adapter rank: higher increases capacity and memory."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input during training."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt, or "all-linear"."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained alongside the adapters."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens)."""

    def problems(self) -> list[str]:
        """Checked only when the strategy trains adapters."""
        problems = []
        if self.r <= 0:
            problems.append(f"lora.r: must be > 0, got {self.r}")
        if self.alpha <= 0:
            problems.append(f"lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            problems.append(f"lora.target_modules: a list of module names or 'all-linear', got {self.target_modules!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            problems.append("lora.target_modules: must not be empty")
        return problems


@dataclass
class QuantizationConfig:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base (qlora)."""
    double_quant: bool = True
    """Quantize the quantization constants too (~0.4 bit/param saved)."""
    compute_dtype: str = "bf16"
    """Dtype the 4-bit weights are dequantized to for matmuls: bf16, fp16 or fp32."""

    def problems(self) -> list[str]:
        if self.compute_dtype in DTYPES:
            return []
        return [
            f"quantization.compute_dtype: must be one of {', '.join(map(repr, DTYPES))}, got {self.compute_dtype!r}"
        ]
