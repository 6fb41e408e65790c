"""Config sections of the model: which weights, and how the adapters and the 4-bit base are set up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dtrain.hub import is_hub_id, resolve
from dtrain.tables import DTYPES


@dataclass
class ModelConfig:
    path: str = ""
    """Local Hugging Face model directory (config.json, safetensors, tokenizer files), or a Hub repo id (org/name):
    downloaded into the Hugging Face cache by check / prepare / submit, read from that cache by the ranks (offline)."""
    revision: str | None = None
    """Hub branch, tag or commit of a repo id in model.path; default main. The commit it resolves to is recorded
    in every checkpoint."""
    tokenizer_path: str | None = None
    """Tokenizer directory or Hub repo id when it is not the model's."""
    trust_remote_code: bool = False
    """Run the Python code a model repo ships (families transformers does not have). Only for repos you trust."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less activation memory, ~30 % more compute."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel passed to transformers. auto: flash_attention_2 where it runs (CUDA, the flash-attn package,
    fp16/bf16; packed rows need no mask then), else sdpa (dtrain.attention). flash_attention_2 needs CUDA and the
    flash-attn package."""
    router_aux_loss_coef: float | None = None
    """Mixture-of-experts models: weight of the router's load-balancing loss added to the training loss (logged
    as train/aux_loss; train/loss stays the language-model loss). null: the model's own (config.json
    router_aux_loss_coef); 0: off. Ignored by dense models."""

    def problems(self, check_paths: bool) -> list[str]:
        """Local paths only: a repo id is resolved by dtrain.preflight (it may download)."""
        problems = []
        if not self.path:
            problems.append("model.path: required (a local Hugging Face model directory or a Hub repo id)")
        elif check_paths and not is_hub_id(self.path) and not (Path(self.path) / "config.json").is_file():
            problems.append(f"model.path: {self.path} has no config.json (expected a Hugging Face model directory)")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            problems.append(f"model.router_aux_loss_coef: must be >= 0 (or null), got {self.router_aux_loss_coef}")
        if self.revision and self.path and not is_hub_id(self.path):
            problems.append(f"model.revision: only for a Hub repo id in model.path, not the folder {self.path}")
        tokenizer = self.tokenizer_path
        if check_paths and tokenizer and not is_hub_id(tokenizer) and not Path(tokenizer).is_dir():
            problems.append(f"model.tokenizer_path: {tokenizer} is not a directory")
        return problems

    def local_dir(self) -> Path:
        """The folder holding the model's files: `path`, or a repo id's snapshot in the Hugging Face cache."""
        return resolve(self.path, self.revision).local

    def tokenizer_dir(self) -> Path:
        if self.tokenizer_path:
            return resolve(self.tokenizer_path).local
        return self.local_dir()

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir(), trust_remote_code=self.trust_remote_code)


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
