"""Config sections of the model: which weights, and how the adapters and the 4-bit base are set up."""

from __future__ import annotations

import math
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
    use_rslora: bool = False
    """Rank-stabilized LoRA: the update is scaled by alpha / sqrt(r) instead of alpha / r (higher ranks keep
    learning)."""
    use_dora: bool = False
    """DoRA: a trained magnitude per output feature of each adapted Linear on top of the LoRA direction (more
    trainable parameters, slower steps). On a 4-bit base (qlora) the adapter needs bitsandbytes' CPU repacking off
    at inference on AVX512-BF16 CPUs (docs/bnb-cpu-repack-dora.md); the merged export does not."""
    init_lora_weights: bool | str = True
    """Adapter initialization, peft's values: true (B = 0, a no-op at step 0), false (A and B random), gaussian,
    orthogonal (r even), nora, pissa / pissa_niter_N (SVD of the base weight) or olora (QR of it). pissa and olora
    move the principal part of each adapted base weight into the adapter (lora only): exports are converted back to
    a LoRA of the original base (rank 2r). The data- or quantization-driven inits (eva, corda, astra, lora_ga,
    loftq) and mica are refused with the reason."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: the B matrices (and the other trained 1-D tensors, peft's grouping) learn at train.lr x this ratio;
    null: one learning rate. The LoRA+ paper uses 16 with a somewhat lower train.lr."""

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
        if self.use_dora and isinstance(self.target_modules, list) and "embed_tokens" in self.target_modules:
            problems.append("lora.use_dora: DoRA adapts Linear layers here; drop embed_tokens from lora.target_modules")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            problems.append(f"lora.loraplus_lr_ratio: must be > 0 (or null: off), got {self.loraplus_lr_ratio}")
        return problems + self._init_problems()

    def _init_problems(self) -> list[str]:
        init = self.init_lora_weights
        if isinstance(init, str) and init in REFUSED_INITS:
            return [f"lora.init_lora_weights: {init!r} is not supported by dtrain: {REFUSED_INITS[init]}"]
        if isinstance(init, str) and init not in PLAIN_INITS and not mutates_base(init):
            choices = ", ".join(["true", "false", *PLAIN_INITS, *BASE_MUTATING_INITS, "pissa_niter_N"])
            return [f"lora.init_lora_weights: must be one of {choices}, got {init!r}"]
        if init == "orthogonal" and self.r % 2:
            return [f"lora.init_lora_weights: orthogonal needs an even lora.r, got {self.r}"]
        if mutates_base(init) and self.use_dora:
            return [
                f"lora.init_lora_weights: {init} with lora.use_dora is refused: the export converts a {init} adapter "
                "to a plain LoRA of the original base, which cannot carry DoRA's magnitude (weight-norm dependent)"
            ]
        return []

    @property
    def scale(self) -> float:
        """What the adapter's B @ A is multiplied by (peft's `scaling`)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


# peft 0.22's init_lora_weights strings that leave the base weights alone and need nothing but the weights.
PLAIN_INITS = ("gaussian", "orthogonal", "nora")
# These subtract the adapter's initial product from the base weights: the model trains on W_res = W - s B0 A0.
BASE_MUTATING_INITS = ("pissa", "olora")
REFUSED_INITS = {
    "eva": "it needs a pass over training data before the adapters exist (peft's initialize_lora_eva_weights)",
    "corda": "it needs a calibration pass over data before the adapters exist (peft's preprocess_corda)",
    "astra": "it needs a calibration pass over data before the adapters exist (peft's preprocess_astra)",
    "lora_ga": "it needs gradient estimates over data before the adapters exist (peft's LoRA-GA preprocessing)",
    "loftq": "it replaces the base with its own quantized residual, which dtrain does not save; use qlora, or "
    "pissa with lora",
    "mica": "it freezes B, which dtrain's adapter checkpoints and exports do not keep (they hold trained tensors)",
}


def mutates_base(init: bool | str) -> bool:
    """pissa, pissa_niter_N (N >= 0) and olora: the init changes the frozen base (see BASE_MUTATING_INITS)."""
    if not isinstance(init, str):
        return False
    niter = init.removeprefix("pissa_niter_")
    return init in BASE_MUTATING_INITS or (niter != init and niter.isdigit())


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
