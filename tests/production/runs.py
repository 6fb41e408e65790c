"""The runs the production-path tests share, each made once per session.

One 2-rank launch of tests/production/worker.py trains every run that needs no interruption (bf16 ZeRO-3 with CPU
and with NVMe offload, an NVMe resume, bf16 LoRA and QLoRA, the accumulation-precision trio) and checks the NVMe
parameter swap buffers; the kill -9, the 1-rank universal resume and the exports are separate launches by the
tests that need them.

The full and NVMe runs use a model whose embedding and lm_head are 8192 x 128: each rank's half is 1 MiB in bf16,
DeepSpeed's smallest swappable tensor (swap_tensor/utils.py MIN_AIO_BYTES). With the usual tiny model nothing would
reach the "NVMe" at all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO, write_config

STEPS = 6
PRODUCTION = [
    # The 70B config's path: bf16, DeepSpeed's CPU Adam under offload of optimizer and parameters, recomputation.
    "train.precision=bf16", "train.optimizer=adamw_deepspeed", "model.gradient_checkpointing=true",
    "deepspeed.offload_optimizer.device=cpu", "deepspeed.offload_param.device=cpu",
    f"train.max_steps={STEPS}", "train.warmup_steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=0",
    "eval.every_steps=0", "data.seq_len=128",
    # the same global batch on 1 and 2 ranks, so the 1-rank universal resume reads the same samples per step
    "train.gradient_accumulation_steps=null", "train.global_batch_size=8",
]  # fmt: skip
ADAPTER = [
    "train.precision=bf16", "model.gradient_checkpointing=true", f"train.max_steps={STEPS}", "train.warmup_steps=1",
    "checkpoint.every_steps=3", "eval.every_steps=3", "data.seq_len=128",
]  # fmt: skip
# 8 micro batches per step, as the 8B QLoRA config accumulates; lr high enough that 6 steps move the loss.
ACCUMULATION = [
    "model.gradient_checkpointing=true", f"train.max_steps={STEPS}", "train.warmup_steps=1", "train.lr=1e-3",
    "train.micro_batch_size=1", "train.gradient_accumulation_steps=8", "checkpoint.every_steps=100",
    "eval.every_steps=0", "data.seq_len=128", "lora.dropout=0.0",
]  # fmt: skip
# Scaled down the way the 70B case is: DeepSpeed's default buffer (1e8 elements) over Llama-3-70B's embedding
# (1.05e9) times this model's (8192 x 128), i.e. the default is to 70B what this buffer is to the test model.
OLD_BUFFER_SIZE = int(1e8 * (8192 * 128) / (128_256 * 8192))


def production_model(root: Path, tiny_model: Path) -> Path:
    """The tiny model's tokenizer with a Llama whose embedding and lm_head are 8192 x 128 (2.6M parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / "model"
    shutil.copytree(tiny_model, out, ignore=shutil.ignore_patterns("model.safetensors", "config.json"))
    config = LlamaConfig.from_pretrained(tiny_model)
    config.update(dict(hidden_size=128, intermediate_size=256, vocab_size=8192))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
    return out


class ProductionRuns:
    def __init__(self, root: Path, tiny_model: Path):
        self.root, self.tiny_model = root, tiny_model
        self.model = production_model(root, tiny_model)
        self.nvme = root / "nvme"
        self.seconds: float | None = None

    def config(self, name: str, base: str = "configs/tiny-full-zero3.yaml", model: Path | None = None) -> Path:
        return write_config(self.root / name / "cfg.yaml", model or self.model, base=base)

    def nvme_overrides(self) -> list[str]:
        """Parameters on NVMe; optimizer states stay on CPU, so the run's checkpoints export (optimizer states on NVMe:
        tests/test_nvme_optimizer.py)."""
        return [*PRODUCTION, "deepspeed.offload_param.device=nvme", f"deepspeed.offload_param.nvme_path={self.nvme}"]

    def jobs(self) -> list[dict]:
        nvme = self.nvme_overrides()[len(PRODUCTION) :]
        lora, qlora = "configs/tiny-lora.yaml", "configs/tiny-qlora.yaml"
        # name -> (base config, model, overrides, kind)
        specs = {
            "full-cpu": (None, None, PRODUCTION, "train"),
            "lora": (
                lora,
                self.tiny_model,
                [*ADAPTER, "deepspeed.stage=3", "train.optimizer=paged_adamw_32bit"],
                "train",
            ),  # fmt: skip
            # the 8B QLoRA config's setup: ZeRO-1 (fp32 accumulation), paged 8-bit AdamW
            "qlora": (
                qlora,
                self.tiny_model,
                [*ADAPTER, "deepspeed.stage=1", "train.optimizer=paged_adamw_8bit"],
                "train",
            ),  # fmt: skip
            "accum-fp32": (
                lora,
                self.tiny_model,
                [*ACCUMULATION, "train.precision=fp32", "deepspeed.stage=1"],
                "train",
            ),  # fmt: skip
            # validated as stage 1, run at stage 0: the config refuses bf16 at stage 0, this run shows why
            "accum-bf16-z0": (
                lora,
                self.tiny_model,
                [*ACCUMULATION, "train.precision=bf16", "deepspeed.stage=1"],
                "train",
            ),  # fmt: skip
            "accum-bf16-z1": (
                lora,
                self.tiny_model,
                [*ACCUMULATION, "train.precision=bf16", "deepspeed.stage=1"],
                "train",
            ),  # fmt: skip
            "swap-old": (None, None, [*PRODUCTION, *nvme], "load"),
            "swap-new": (None, None, [*PRODUCTION, *nvme], "load"),
            "full-nvme": (None, None, [*PRODUCTION, *nvme], "train"),
            "nvme-resume": (
                None,
                None,
                [*PRODUCTION, *nvme, f"checkpoint.resume={self.checkpoint('full-nvme', 2)}"],
                "train",
            ),  # fmt: skip
        }
        jobs = []
        for name, (base, model, overrides, kind) in specs.items():
            config = self.config(name, base or "configs/tiny-full-zero3.yaml", model)
            job = {"kind": kind, "out": str(self.root / name / "out"), "config": str(config), "overrides": overrides}
            if name == "swap-old":
                job["buffer_size"] = OLD_BUFFER_SIZE
            if name == "accum-bf16-z0":
                job["unchecked_stage"] = 0
            jobs.append(job)
        return jobs

    def checkpoint(self, name: str, step: int) -> Path:
        return self.root / name / "run" / "checkpoints" / f"step-{step:08d}"

    def run_all(self) -> None:
        jobs = self.root / "jobs.json"
        jobs.write_text(json.dumps(self.jobs(), indent=2))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tests.production.worker", str(jobs)]  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
        self.seconds = time.perf_counter() - started
        (self.root / "worker.log").write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"

    def run(self, name: str) -> Path:
        return self.root / name / "run"

    def out(self, name: str) -> Path:
        return self.root / name / "out"


_shared: ProductionRuns | None = None


def production_runs(tmp_path_factory, tiny_model: Path) -> ProductionRuns:
    global _shared
    if _shared is None:
        _shared = ProductionRuns(tmp_path_factory.mktemp("production"), tiny_model)
        _shared.run_all()
    return _shared
